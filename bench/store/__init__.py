"""Store benchmark: `python -m bench.store` (see docs/store.md for what it measures)."""
