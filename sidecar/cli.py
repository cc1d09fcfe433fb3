"""The ``lora-sidecar`` command (also ``python -m sidecar``).

    lora-sidecar [serve] [--drain]               the stdio JSON-RPC server (default); --drain runs a
                                                 file of requests to its end (exit 1 if any failed)
    lora-sidecar schema                          JSON Schema of every wire message
    lora-sidecar train --config C --output DIR   one-shot job, old peft-train.py config keys
    lora-sidecar demo                            README command 1
    lora-sidecar export --format F ADAPTER_DIR   an adapter as gguf-lora / merged / merged-gguf
    lora-sidecar --version
"""

from __future__ import annotations

import argparse
import json
import sys

from . import PROTOCOL_VERSION, __version__


DRAIN_HELP = ("run a script of requests to its end: end of input and `shutdown` finish the jobs received "
              "(in order, every answer printed) instead of cancelling them; exit status 0 when every "
              "request succeeded, 1 otherwise")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-sidecar", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"lora-sidecar {__version__} (protocol {PROTOCOL_VERSION})")
    parser.add_argument("--drain", action="store_true", help=DRAIN_HELP)
    sub = parser.add_subparsers(dest="command")
    serve = sub.add_parser("serve", help="run the JSON-RPC server on stdin/stdout (default)")
    serve.add_argument("--drain", action="store_true", default=argparse.SUPPRESS, help=DRAIN_HELP)
    sub.add_parser("schema", help="print the JSON Schema of every wire message")
    train = sub.add_parser("train", help="one-shot training from an old peft-train.py JSON config")
    train.add_argument("--config", required=True, help="JSON config file (baseModel, datasetPath, rank, ...)")
    train.add_argument("--output", help="adapter output directory (overrides the config's outputDir)")
    demo = sub.add_parser("demo", help="train a small adapter on the embedded model and compare answers")
    demo.add_argument("--model", default="default", help="base model (default: the embedded SmolLM2-135M)")
    demo.add_argument("--output", help="where to write the demo adapter")
    export = sub.add_parser("export", help="export an adapter for llama.cpp, Ollama or transformers")
    export.add_argument("adapter", metavar="ADAPTER_DIR", help="the adapter directory (adapter_config.json, ...)")
    export.add_argument("--format", required=True, choices=["gguf-lora", "merged", "merged-gguf"])
    export.add_argument("-o", "--output", help="output file (GGUF) or directory (merged); default: ADAPTER_DIR/exports/")
    export.add_argument("--out-type", choices=["f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m", "q5_k_m", "q6_k"],
                        help="tensor encoding (default f16 for GGUF, the base's dtype for merged; q4_0, q4_k_m, "
                        "q5_k_m, q6_k: merged-gguf only, quantized by llama.cpp)")
    export.add_argument("--overwrite", action="store_true", help="replace an existing export at the output path")
    export.add_argument("--base-model", help="the adapter's base model, when its manifest/config does not resolve")
    export.add_argument("--json", action="store_true", help="print the result as JSON (the method's result)")
    args = parser.parse_args(argv)

    if args.drain and args.command not in (None, "serve"):
        parser.error("--drain is an option of the server (lora-sidecar [serve] --drain)")
    if args.command in (None, "serve"):
        from .server import serve_stdio

        return serve_stdio(drain=args.drain)
    if args.command == "schema":
        from .wire import json_schema

        json.dump(json_schema(), sys.stdout, indent=2)
        sys.stdout.write("\n")
        return 0
    if args.command == "train":
        from .compat import run_config

        return run_config(args.config, args.output)
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(model=args.model, output=args.output)
    if args.command == "export":
        return _export(args)
    parser.error(f"unknown command {args.command}")
    return 2


def _export(args: argparse.Namespace) -> int:
    import logging

    from . import errors, housekeeping, wire

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    from .adapters.export import export_adapter

    claims, _ = housekeeping.start()  # as the server: what a killed export leaves is removed at the next start
    try:
        result = export_adapter(args.adapter, args.format, output_path=args.output, out_type=args.out_type,
                                overwrite=args.overwrite, base_model=args.base_model, claims=claims)
    except errors.SidecarError as exc:
        print(f"lora-sidecar export: {exc.message}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(wire.to_builtins(result), indent=2))
        return 0
    print(f"{result.format} ({result.out_type}): {result.output_path}  "
          f"[{result.bytes / 2**20:.1f} MiB, sha256 {result.sha256[:16]}…, {result.duration_ms} ms]")
    if result.modelfile_path:
        print(f"Ollama Modelfile: {result.modelfile_path}")
    if result.base_gguf and result.format == "gguf-lora":
        print(f"llama.cpp: llama-cli -m {result.base_gguf} --lora {result.output_path}")
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0
