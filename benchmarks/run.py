"""`python benchmarks/run.py [--quick] [--out PATH]`: the same as `jaxq bench` (see jaxq/bench.py)."""

import sys

from jaxq.bench import main

if __name__ == "__main__":
    sys.exit(main())
