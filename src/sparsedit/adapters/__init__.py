"""Adapters: attach the sparse engine to existing model families (one file per family)."""
