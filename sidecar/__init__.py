"""lora-sidecar: a long-lived JSON-RPC 2.0 stdio process that trains LoRA adapters."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.0"


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries the sidecar runs on (installed metadata; imports nothing)."""
    import importlib.metadata
    import sys

    out = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "jsonrpcserver", "msgspec",
                 "gguf", "safetensors", "bitsandbytes"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out
