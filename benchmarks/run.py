"""`python benchmarks/run.py [--quick] [--out PATH]`: the same as `jaxq bench` (see jaxq/benchmarks/bench.py)."""

import sys

from jaxq.benchmarks import main

if __name__ == "__main__":
    sys.exit(main())
