"""Adapters: residency, stacking, composition, export."""
