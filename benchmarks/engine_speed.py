"""Superseded by `jaxq bench` (jaxq/benchmarks/bench.py), which measures all of this and more in one run; kept
as an alias: `python benchmarks/engine_speed.py [--quick] [--out ...]` runs `jaxq bench`."""

import sys

from jaxq.benchmarks import main

if __name__ == "__main__":
    sys.exit(main())
