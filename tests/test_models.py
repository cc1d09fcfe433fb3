"""Model resolution, the warm ModelCache, the atomic once-only builds, and the embedded SmolLM2 model."""

from __future__ import annotations

import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from sidecar import errors, models
from sidecar.models import MARKER, ModelCache, resolve_model


@pytest.fixture
def offline_hf_cache(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache in tmp, with the hub marked offline."""
    cache = tmp_path / "hf-hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def _fake_hub_snapshot(cache: Path, repo_id: str, source: Path, *, with_ref: bool = True) -> Path:
    """Lay out ``source`` the way huggingface_hub caches a download (refs/main → snapshots/<sha>)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(source, snapshot)
    if with_ref:
        (repo / "refs").mkdir(parents=True)
        (repo / "refs" / "main").write_text(commit)
    return snapshot


# ---------------------------------------------------------------------------------------------
# resolve_model
# ---------------------------------------------------------------------------------------------

class TestResolve:
    def test_directory_with_config(self, tiny_model_dir):
        resolved = resolve_model(str(tiny_model_dir))
        assert resolved.kind == "directory"
        assert resolved.path == str(tiny_model_dir.resolve())
        assert resolved.gguf_file is None

    def test_gguf_file_path(self, tmp_path):
        gguf = tmp_path / "weights" / "model.Q4_0.gguf"
        gguf.parent.mkdir()
        gguf.write_bytes(b"GGUF")  # resolution must not read it
        resolved = resolve_model(str(gguf))
        assert (resolved.kind, resolved.path, resolved.gguf_file) == ("gguf", str(gguf.parent), "model.Q4_0.gguf")
        # a directory holding exactly one .gguf file resolves to it as well
        assert resolve_model(str(gguf.parent)).gguf_file == "model.Q4_0.gguf"

    def test_unknown_name_lists_what_was_tried(self, offline_hf_cache, tmp_path):
        with pytest.raises(errors.ModelNotFound) as caught:
            resolve_model("acme/does-not-exist")
        exc = caught.value
        assert exc.CODE == -32011
        assert exc.data["name"] == "acme/does-not-exist"
        tried = exc.data["tried"]
        assert any("local path" in t and "does not exist" in t for t in tried)
        assert any(str(offline_hf_cache) in t for t in tried)
        assert any("HF_HUB_OFFLINE" in t for t in tried)
        assert all(t in exc.message for t in tried)

        empty_dir = tmp_path / "empty"
        empty_dir.mkdir()
        with pytest.raises(errors.ModelNotFound, match="no config.json"):
            resolve_model(str(empty_dir))
        not_gguf = tmp_path / "weights.bin"
        not_gguf.write_bytes(b"x")
        with pytest.raises(errors.ModelNotFound, match="not a .gguf file"):
            resolve_model(str(not_gguf))
        with pytest.raises(errors.ModelNotFound, match="empty"):
            resolve_model("  ")

    def test_uncached_hub_id_online_is_left_to_the_loader(self, tmp_path, monkeypatch):
        monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        assert resolve_model("acme/some-model").kind == "hub"
        # a bare word is not treated as a hub id: a typo must fail here, not on a download
        with pytest.raises(errors.ModelNotFound):
            resolve_model("smollm3-typo")

    def test_hub_cache_lookup(self, offline_hf_cache, tiny_model_dir):
        snapshot = _fake_hub_snapshot(offline_hf_cache, "acme/tiny-llama", tiny_model_dir)
        resolved = resolve_model("acme/tiny-llama")
        assert (resolved.kind, resolved.path) == ("hub-cache", str(snapshot))

        loaded = ModelCache().get("acme/tiny-llama")
        assert loaded.resolved.kind == "hub-cache"
        assert loaded.model.config.num_hidden_layers == 2

    def test_hub_cache_without_ref(self, offline_hf_cache, tiny_model_dir):
        snapshot = _fake_hub_snapshot(offline_hf_cache, "acme/pinned", tiny_model_dir, with_ref=False)
        assert resolve_model("acme/pinned").path == str(snapshot)


# ---------------------------------------------------------------------------------------------
# devices and dtypes
# ---------------------------------------------------------------------------------------------

class TestDeviceAndDtype:
    def test_select_dtype(self):
        assert models.select_dtype("cpu", "auto") is torch.float32
        assert models.select_dtype("mps", "auto") is torch.float32
        assert models.select_dtype("cpu", "bfloat16") is torch.bfloat16
        assert models.select_dtype("cpu", "float16") is torch.float16
        assert models.select_dtype("cpu", "float32") is torch.float32
        assert models.dtype_warning("cpu", torch.float16) is not None
        assert models.dtype_warning("cpu", torch.float32) is None
        with pytest.raises(errors.Unsupported):
            models.select_dtype("cpu", "int3")

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
    def test_select_device_without_gpu(self):
        assert models.select_device("cpu") == "cpu"
        if not torch.backends.mps.is_available():
            assert models.select_device("auto") == "cpu"
        with pytest.raises(errors.Unsupported, match="CUDA"):
            models.select_device("cuda")
        quant = models.quantization_support()
        assert not quant.four_bit and not quant.eight_bit and "CUDA" in quant.reason

    def test_device_report_lists_cpu(self):
        report = models.device_report()
        assert report[0].type == "cpu" and report[0].memory_bytes and report[0].memory_bytes > 0
        assert [d.type == "cuda" for d in report].count(True) == torch.cuda.device_count()


# ---------------------------------------------------------------------------------------------
# ModelCache
# ---------------------------------------------------------------------------------------------

class TestModelCache:
    def test_hit_does_not_reload(self, tiny_model_dir):
        cache = ModelCache()
        calls = []
        first = cache.get(str(tiny_model_dir), on_loading=lambda: calls.append(1))
        assert not first.cached and calls == [1]
        assert first.device == "cpu" and first.dtype is torch.float32
        assert not first.model.training
        assert not any(p.requires_grad for p in first.model.parameters())
        assert first.tokenizer.pad_token == "<|im_end|>" and first.tokenizer.chat_template
        assert first.key == (str(tiny_model_dir.resolve()), "cpu", torch.float32, None)

        second = cache.get(str(tiny_model_dir), on_loading=lambda: calls.append(2))
        assert second.cached and calls == [1]
        assert second.model is first.model and second.tokenizer is first.tokenizer
        assert second.load_seconds < 0.1
        assert cache.loaded() == [str(tiny_model_dir)]

    def test_lru_eviction_by_count(self, tiny_model_dir):
        cache = ModelCache(max_models=2)
        name = str(tiny_model_dir)
        a = cache.get(name, dtype="float32")
        b = cache.get(name, dtype="bfloat16")
        b_model = weakref.ref(b.model)
        assert cache.get(name, dtype="float32").cached  # touch a: b is now least recently used
        c = cache.get(name, dtype="float16")
        dtypes = [e.dtype for e in cache.entries()]
        assert dtypes == [torch.float32, torch.float16]
        del b
        gc.collect()
        assert b_model() is None, "an evicted model must not stay referenced by the cache"
        assert cache.get(name, dtype="bfloat16").cached is False
        assert a.model is not c.model
        cache.evict_all()
        assert cache.loaded() == []

    def test_memory_budget(self, tiny_model_dir):
        probe = ModelCache().get(str(tiny_model_dir))
        cache = ModelCache(max_models=5, max_bytes=probe.nbytes + 1)
        cache.get(str(tiny_model_dir), dtype="float32")
        cache.get(str(tiny_model_dir), dtype="bfloat16")
        assert [e.dtype for e in cache.entries()] == [torch.bfloat16]

    def test_env_overrides(self, monkeypatch):
        monkeypatch.setenv("LORA_SIDECAR_MAX_MODELS", "3")
        monkeypatch.setenv("LORA_SIDECAR_MAX_MODEL_BYTES", "1.5G")
        cache = ModelCache()
        assert (cache.max_models, cache.max_bytes) == (3, int(1.5 * 2**30))
        assert ModelCache(max_models=1).max_models == 1  # an explicit argument wins
        monkeypatch.setenv("LORA_SIDECAR_MAX_MODEL_BYTES", "lots")
        with pytest.raises(ValueError, match="LORA_SIDECAR_MAX_MODEL_BYTES"):
            ModelCache()

    @pytest.mark.skipif(torch.cuda.is_available(), reason="quantization is available on this machine")
    def test_quantization_unavailable_is_never_silent(self, tiny_model_dir):
        loaded = ModelCache().get(str(tiny_model_dir), quantize_bits=4)
        assert loaded.key[3] is None
        assert any("4-bit" in w and "without quantization" in w for w in loaded.warnings)
        assert loaded.model.dtype is torch.float32

    @pytest.mark.parametrize("native", [True, False])
    def test_bf16_on_cpu_warns_only_without_native_bf16(self, tiny_model_dir, monkeypatch, native):
        monkeypatch.setattr(models.devices, "cpu_has_native_bf16", lambda: native)
        loaded = ModelCache().get(str(tiny_model_dir), device="cpu", dtype="bfloat16")
        assert loaded.model.dtype is torch.bfloat16
        assert any("slower" in w for w in loaded.warnings) is not native

    def test_fingerprint(self, tiny_model_dir):
        cache = ModelCache()
        loaded = cache.get(str(tiny_model_dir))
        fp = loaded.fingerprint()
        assert len(fp) == 64
        assert cache.get(str(tiny_model_dir)).fingerprint() == fp  # shared by the cache-hit view
        assert ModelCache().get(str(tiny_model_dir)).fingerprint() == fp  # same weights, fresh load
        weight = loaded.model.model.layers[0].mlp.down_proj.weight
        original = weight[0, 0].item()
        with torch.no_grad():
            weight[0, 0] = original + 1.0
            try:
                assert models.compute_fingerprint(loaded.model) != fp
            finally:
                weight[0, 0] = original
        assert models.compute_fingerprint(loaded.model) == fp

    def test_tokenizer_fallbacks(self, tiny_model_dir, tmp_path):
        bare = tmp_path / "no-template"
        shutil.copytree(tiny_model_dir, bare)
        (bare / "chat_template.jinja").unlink(missing_ok=True)
        config_path = bare / "tokenizer_config.json"
        config = json.loads(config_path.read_text())
        config.pop("chat_template", None)
        config.pop("pad_token", None)
        config_path.write_text(json.dumps(config))

        loaded = ModelCache().get(str(bare))
        assert loaded.tokenizer.chat_template == models.CHATML_TEMPLATE
        assert loaded.tokenizer.pad_token == loaded.tokenizer.eos_token == "<|im_end|>"
        assert any("no chat template" in w for w in loaded.warnings)
        text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                    add_generation_prompt=True)
        assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"

    def test_load_failure_is_model_load_failed(self, tiny_model_dir, tmp_path):
        broken = tmp_path / "broken"
        broken.mkdir()
        shutil.copy(tiny_model_dir / "config.json", broken / "config.json")
        (broken / "model.safetensors").write_bytes(b"not a safetensors file")
        with pytest.raises(errors.ModelLoadFailed) as caught:
            ModelCache().get(str(broken))
        assert caught.value.data["path"] == str(broken.resolve())
        assert caught.value.data["cause"]
        assert str(broken.resolve()) in caught.value.message


# ---------------------------------------------------------------------------------------------
# _build_once: the atomic, once-only directory build behind the embedded conversion
# ---------------------------------------------------------------------------------------------

def _write_files(tmp: Path) -> None:
    (tmp / "config.json").write_text("{}")


class TestBuildOnce:
    def test_failed_build_leaves_nothing(self, tmp_path):
        target = tmp_path / "model"

        def explode(tmp: Path) -> None:
            _write_files(tmp)
            raise RuntimeError("killed half way")

        with pytest.raises(RuntimeError):
            models.embedded._build_once(target, explode, source=None)
        assert not target.exists()
        assert not list(tmp_path.glob(".model.tmp-*"))

    def test_untrusted_leftovers_are_redone(self, tmp_path):
        target = tmp_path / "model"
        target.mkdir()
        (target / "config.json").write_text("half written")  # no marker: never trusted
        stale_tmp = tmp_path / ".model.tmp-dead"
        stale_tmp.mkdir()
        calls = []
        models.embedded._build_once(target, lambda tmp: (calls.append(1), _write_files(tmp)), source=None)
        assert calls == [1]
        assert (target / MARKER).is_file() and (target / "config.json").read_text() == "{}"
        assert not stale_tmp.exists()
        models.embedded._build_once(target, lambda tmp: calls.append(2), source=None)
        assert calls == [1]

    def test_changed_source_is_rebuilt(self, tmp_path):
        source = tmp_path / "model.gguf"
        source.write_bytes(b"v1")
        target = tmp_path / "model"
        calls = []
        models.embedded._build_once(target, lambda tmp: calls.append(1), source=source)
        models.embedded._build_once(target, lambda tmp: calls.append(2), source=source)
        source.write_bytes(b"version 2")
        models.embedded._build_once(target, lambda tmp: calls.append(3), source=source)
        assert calls == [1, 3]

    def test_concurrent_builders_build_once(self, tmp_path):
        target = tmp_path / "model"
        calls = []

        def slow(tmp: Path) -> None:
            calls.append(1)
            time.sleep(0.3)
            _write_files(tmp)

        threads = [threading.Thread(target=models.embedded._build_once, args=(target, slow), kwargs={"source": None})
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert calls == [1] and (target / MARKER).is_file()


# ---------------------------------------------------------------------------------------------
# The embedded SmolLM2-135M: one real conversion
# ---------------------------------------------------------------------------------------------

@pytest.mark.smollm2
class TestEmbedded:
    def test_convert_once_then_load_fast(self, tmp_path, monkeypatch):
        cache_dir = tmp_path / "model-cache"
        monkeypatch.setenv("LORA_SIDECAR_MODEL_CACHE", str(cache_dir))
        target = cache_dir / models.EMBEDDED_DIRNAME

        pending = resolve_model("default", convert=False)
        assert (pending.kind, pending.ready, pending.description) == ("embedded", False, "embedded (not converted yet)")
        assert pending.path == str(target)

        # A conversion killed half way must leave nothing a later run trusts.
        child = subprocess.Popen(
            [sys.executable, "-c", "from sidecar.models import ensure_embedded_checkpoint as e; e()"],
            env={**os.environ, "LORA_SIDECAR_MODEL_CACHE": str(cache_dir)},
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while not list(cache_dir.glob(".*.tmp-*")) and time.monotonic() < deadline:
                assert child.poll() is None, "the conversion ended before it could be interrupted"
                time.sleep(0.05)
            assert list(cache_dir.glob(".*.tmp-*")), "no temporary directory appeared"
            time.sleep(1.0)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
        assert not (target / MARKER).exists()
        assert resolve_model("smollm2-135m", convert=False).ready is False

        started = time.monotonic()
        resolved = resolve_model("Default")  # converts (about 30 s), cleaning up the killed attempt
        convert_seconds = time.monotonic() - started
        assert resolved.kind == "embedded" and resolved.ready and Path(resolved.path) == target
        assert (target / MARKER).is_file() and (target / "model.safetensors").is_file()
        assert not list(cache_dir.glob(".*.tmp-*"))
        config = json.loads((target / "config.json").read_text())
        assert "quantization_config" not in config and config["tie_word_embeddings"] is True
        assert config["eos_token_id"] == config["pad_token_id"] == 2
        print(f"embedded conversion: {convert_seconds:.1f} s")

        # Second resolve + load in a fresh cache: no conversion, loads from the checkpoint. Checked by what
        # happens, not by a time (a 1 s bound broke on a loaded machine): the converter is made to fail, and
        # every file of the converted directory is the same file (inode, size, mtime) afterwards.
        def identities(root: Path) -> dict:
            return {str(f.relative_to(root)): (f.stat().st_ino, f.stat().st_size, f.stat().st_mtime_ns)
                    for f in sorted(root.rglob("*")) if f.is_file()}

        converted = identities(target)

        def no_conversion(*args, **kwargs):
            raise AssertionError("the embedded model was converted again")

        monkeypatch.setattr(models.embedded, "_convert_gguf", no_conversion)
        started = time.monotonic()
        again = resolve_model("smollm2-135m")
        loaded = ModelCache().get("smollm2-135m")
        total = time.monotonic() - started
        assert again.path == resolved.path and not loaded.cached
        assert loaded.resolved.path == str(target)
        assert identities(target) == converted and not list(cache_dir.glob(".*.tmp-*"))
        print(f"embedded resolve + load from cache: {total:.2f} s (load {loaded.load_seconds:.2f} s)")
        tok = loaded.tokenizer
        assert tok.pad_token == tok.eos_token == "<|im_end|>" and len(tok) == 49152

        # The converted weights are the real model: it answers a question it knows.
        inputs = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                         add_generation_prompt=True, return_tensors="pt", return_dict=True)
        out = loaded.model.generate(**inputs, max_new_tokens=12, do_sample=False)
        answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert "Paris" in answer, answer
