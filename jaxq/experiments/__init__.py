"""Experiments: finite-n studies, sweeps and the reproduction of the paper's numerical study."""
