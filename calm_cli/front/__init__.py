"""Fronts: thin adapters that take requests in and give records out over the one loop (jsonl.py: `calm batch`
and `calm serve-stdin`)."""
