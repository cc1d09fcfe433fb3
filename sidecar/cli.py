"""The ``lora-sidecar`` command (also ``python -m sidecar``).

    lora-sidecar [serve]                         the stdio JSON-RPC server (default)
    lora-sidecar schema                          JSON Schema of every wire message
    lora-sidecar train --config C --output DIR   one-shot job, old peft-train.py config keys
    lora-sidecar demo                            README command 1
    lora-sidecar --version
"""

from __future__ import annotations

import argparse
import json
import sys

from . import PROTOCOL_VERSION, __version__


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lora-sidecar", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"lora-sidecar {__version__} (protocol {PROTOCOL_VERSION})")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("serve", help="run the JSON-RPC server on stdin/stdout (default)")
    sub.add_parser("schema", help="print the JSON Schema of every wire message")
    train = sub.add_parser("train", help="one-shot training from an old peft-train.py JSON config")
    train.add_argument("--config", required=True, help="JSON config file (baseModel, datasetPath, rank, ...)")
    train.add_argument("--output", help="adapter output directory (overrides the config's outputDir)")
    demo = sub.add_parser("demo", help="train a small adapter on the embedded model and compare answers")
    demo.add_argument("--model", default="default", help="base model (default: the embedded SmolLM2-135M)")
    demo.add_argument("--output", help="where to write the demo adapter")
    args = parser.parse_args(argv)

    if args.command in (None, "serve"):
        from .server import serve_stdio

        return serve_stdio()
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
    parser.error(f"unknown command {args.command}")
    return 2
