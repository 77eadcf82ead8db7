"""Parameter sweeps: a grid file of scenario fields and run settings, run in batches with one compile
per shape group, replicas sharded over devices, resumable CSV + manifest outputs (docs/sweeps.md)."""

from .grid import (
           MODEL_FIELDS,
           RUN_FIELDS,
           Grid,
           Point,
           load_grid,
           loads_grid,
           parse_grid,
)
from .runner import (
           PointResult,
           SweepOutcome,
           plan_chunks,
           replica_keys,
           run_points,
           run_sweep,
)

__all__ = ["MODEL_FIELDS", "RUN_FIELDS", "Grid", "Point", "PointResult", "SweepOutcome", "load_grid", "loads_grid",
           "parse_grid", "plan_chunks", "replica_keys", "run_points", "run_sweep"]
