"""lora-sidecar: a long-lived JSON-RPC 2.0 stdio process that trains LoRA adapters."""

__version__ = "0.1.0"
PROTOCOL_VERSION = "1.0"
