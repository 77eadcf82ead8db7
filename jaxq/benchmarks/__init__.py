"""Speed measurements: ``jaxq bench`` (the engines, the peers Ciw and SimPy, the reference simulator,
scaling). Figures are written to a JSON record, never asserted by tests (benchmarks/README.md)."""

from .bench import PRESETS, main, run_bench

__all__ = ["PRESETS", "main", "run_bench"]
