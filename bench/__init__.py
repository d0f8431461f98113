"""The benchmark: `python -m bench.run [--quick]` (see the README, "Performance")."""
