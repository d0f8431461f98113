"""The benchmark: `python -m bench.run [--quick]` (see docs/performance.md)."""
