"""Adapters: putting LoRA layers on the warm base and taking them off (``surgery``), residency,
stacking, composition and export."""
