"""Shared pieces of the trace tests (fixtures registered in conftest.py): the real Azure trace (skipped when absent), and synthetic traces drawn
from known classes (Poisson arrivals, lognormal lengths, fixed seeds)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

# the project's shared data folder, beside the repository (../shared from its root)
AZURE = Path(__file__).resolve().parents[3] / "shared" / "data" / "azure-llm-2023" / "AzureLLMInferenceTrace_conv.csv"


@pytest.fixture
def azure_path() -> Path:
    if not AZURE.is_file():
        pytest.skip(f"the Azure LLM inference trace is not on this machine ({AZURE})")
    return AZURE


@dataclasses.dataclass(frozen=True)
class TrueClass:
    rate: float  # requests/s
    median_p: float  # lognormal medians (tokens) and the sd of the log length
    median_d: float
    sigma: float = 0.3

    @property
    def mean_p(self) -> float:
        return self.median_p * np.exp(self.sigma**2 / 2)

    @property
    def mean_d(self) -> float:
        return self.median_d * np.exp(self.sigma**2 / 2)


# three classes far apart in (log prompt, log output): chat, long-output, long-prompt
THREE = (TrueClass(3.0, 200, 800), TrueClass(2.0, 2000, 60), TrueClass(1.0, 9000, 1500))


def draw(classes, horizon_s: float, seed: int):
    """(arrival_s, prompt, output, class index) of independent Poisson streams over [0, horizon_s],
    merged in time order."""
    rng = np.random.default_rng(seed)
    parts = []
    for i, c in enumerate(classes):
        m = rng.poisson(c.rate * horizon_s)
        t = np.sort(rng.uniform(0, horizon_s, m))  # a Poisson process given its count
        p = np.maximum(1, np.rint(c.median_p * np.exp(c.sigma * rng.standard_normal(m)))).astype(np.int64)
        d = np.maximum(1, np.rint(c.median_d * np.exp(c.sigma * rng.standard_normal(m)))).astype(np.int64)
        parts.append((t, p, d, np.full(m, i)))
    t, p, d, k = (np.concatenate(x) for x in zip(*parts))
    order = np.argsort(t, kind="stable")
    return t[order], p[order], d[order], k[order]


def write_generic(path: Path, t, p, d, labels=None) -> Path:
    with open(path, "w") as fh:
        fh.write("arrival_s,prompt_tokens,output_tokens" + (",class" if labels is not None else "") + "\n")
        for r in range(len(t)):
            fh.write(f"{float(t[r])!r},{p[r]},{d[r]}" + (f",{labels[r]}" if labels is not None else "") + "\n")
    return path


def write_azure(path: Path, t, p, d, start="2023-11-16T18:15:46.6805900") -> Path:
    """Azure schema: times as YYYY-MM-DD HH:MM:SS.fffffff (100 ns resolution, as the real file)."""
    stamps = np.datetime64(start, "ns") + (np.rint(np.asarray(t) * 1e7).astype(np.int64) * 100).astype("timedelta64[ns]")
    text = [str(s).replace("T", " ")[:27] for s in stamps]
    with open(path, "w", newline="") as fh:
        fh.write("TIMESTAMP,ContextTokens,GeneratedTokens\r\n")
        fh.write("\r\n".join(f"{s},{a},{b}" for s, a, b in zip(text, p, d)))
    return path


@pytest.fixture
def three_class_file(tmp_path) -> tuple[Path, tuple]:
    t, p, d, k = draw(THREE, 1500.0, seed=7)
    return write_azure(tmp_path / "three.csv", t, p, d), (t, p, d, k)
