"""Reference simulator: a slow, plain-Python, obviously-correct simulation of the cluster CTMC.

It simulates the model of MODEL.md §1-2 (per-GPU state as in §2.2) under the policies of §5 and the
baselines of §7.3, and shares no simulation code with the JAX engine: only the parameter loading
(:class:`jaxq.model.Scenario`) is common. It exists to test the engine (and to be read); speed is not a
goal. See ``docs/reference-simulator.md`` for the full description.

**Method (Gillespie).** The system is a continuous-time Markov chain: arrivals are Poisson, service
and patience times are exponential, and every decision is taken immediately at an event epoch. At each
step the simulator lists every enabled transition with its rate,

* arrival of class i ............................ n lam_i
* prefill-queue abandonment of class i .......... theta_i Q_{p,i}
* decode-buffer abandonment of class i (per buffer) theta_i Q_{d,i}(buffer)
* prefill completion of class i ................. mu_{p,i} X_i
* decode completion of class i at the mixed rate  mu_{m,i} (class-i decodes running at mu_m)
* decode completion of class i at the solo rate . mu_{s,i} (class-i decodes running at mu_s)

draws the time to the next event as Exp(total rate) and the event with probability rate/total, then
picks the individual job/GPU uniformly at random among those that the event can concern (weighted by
the number of class-i decodes for a decode completion). That is exact for a CTMC. After the event the
policy's ``dispatch`` fills every slot that can be filled (a freed slot is refilled at once, as often
as capacity and queues allow).

**Per-GPU state.** Each GPU has a group ("mix" / "solo" under static planning, "any" otherwise), the
class of the prefill it runs (-1 = none) and its number of decodes per class. Capacity: a "mix" GPU
has one prefill slot plus at most B-1 decodes; a "solo" GPU never prefills and holds at most B
decodes; an "any" GPU holds at most B jobs in total, at most one of them in prefill.

**Decode rate (mode convention).** Convention "B" (default, paper eqs. 18-19): a decode runs at
mu_m while its GPU runs a prefill, else at mu_s, whatever the group. Convention "A": decodes on "mix"
GPUs always run at mu_m and on "solo" GPUs at mu_s; on "any" GPUs (baselines without static planning)
convention A has no meaning and the simulator falls back to convention B.

**Reported Y_m / Y_s** are always by GPU status, as in the paper: Y_m counts decodes on GPUs that are
running a prefill at that moment, Y_s the others (under convention A this differs from the rate
split).

All statistics (counters, time averages, revenue) cover the window [warmup, horizon]; the conservation
counters cover the whole run [0, horizon]. The system starts empty.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time as _time
from collections.abc import Sequence

import numpy as np

from ..model import Scenario

POLICIES = ("gg-sp", "prioritize", "sli", "fi-wsp", "gi-wsp", "gf-wsp", "fg-sp")
_ALIASES = {
    "gate-and-route": "gg-sp",
    "prioritize-and-route": "prioritize",
    "pr-sp": "prioritize",
    "sli-aware": "sli",
    "sli-aware-gate-and-route": "sli",
}
CONVENTIONS = ("A", "B")
COUNTERS = (
    "arrivals",
    "arrivals_waited",
    "prefill_admissions",
    "prefill_completions",
    "decode_admissions",
    "decode_completions",
    "abandon_prefill",
    "abandon_decode",
)


# ---------------------------------------------------------------------------------------------------
# Targets from static planning
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class PolicyTargets:
    """Static-planning outputs a policy needs (MODEL.md §4.3).

    * ``num_mixed``: M, the number of G_mix GPUs (GPUs 0..M-1; the rest are G_solo). Used by the
      static-partition policies (gg-sp, prioritize, sli, fg-sp).
    * ``x_star``: per-class prefill-occupancy targets x_i* (per GPU). Used by the xi gate (gg-sp, sli,
      gi-wsp, gf-wsp).
    * ``q_p_star``: per-class prefill-queue targets q_{p,i}* (per GPU); Qdagger_i = n q_{p,i}*. Used
      for the xi gate's tie-break.
    * ``p_solo``: per-class probability p_{s,i} that the SLI router targets G_solo (sli only).

    Arrays are float64 NumPy, one entry per class.
    """

    num_mixed: int
    x_star: np.ndarray
    q_p_star: np.ndarray
    p_solo: np.ndarray | None = None

    def __post_init__(self):
        if isinstance(self.num_mixed, bool) or not isinstance(self.num_mixed, (int, np.integer)):
            raise ValueError(f"targets.num_mixed must be an integer >= 0, got {self.num_mixed!r}")
        if int(self.num_mixed) < 0:
            raise ValueError(f"targets.num_mixed must be an integer >= 0, got {self.num_mixed!r}")
        object.__setattr__(self, "num_mixed", int(self.num_mixed))
        for name in ("x_star", "q_p_star", "p_solo"):
            value = getattr(self, name)
            if value is None:
                if name != "p_solo":
                    raise ValueError(f"targets.{name} is required")
                continue
            arr = np.array(value, dtype=np.float64).ravel()
            if arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"targets.{name} must be a non-empty vector of finite numbers >= 0, "
                                 f"got {value!r}")
            if name == "p_solo" and np.any(arr > 1):
                raise ValueError(f"targets.p_solo must lie in [0, 1], got {value!r}")
            arr.setflags(write=False)
            object.__setattr__(self, name, arr)
        if len(self.q_p_star) != len(self.x_star):
            raise ValueError("targets.q_p_star must have one entry per class, like targets.x_star")
        if self.p_solo is not None and len(self.p_solo) != len(self.x_star):
            raise ValueError("targets.p_solo must have one entry per class, like targets.x_star")

    @classmethod
    def from_plan(cls, scenario: Scenario, x_star, q_p_star, y_m=None, y_s=None) -> "PolicyTargets":
        """Targets from an LP solution: M = ceil(n * sum x*) (with a 1e-9 guard against round-off
        pushing an integer up), Qdagger = n q_p*, and, when ``y_m``/``y_s`` are given,
        p_{s,i} = mu_{s,i} y_{s,i} / (mu_{m,i} y_{m,i} + mu_{s,i} y_{s,i}) (1 when the denominator is 0)."""
        x_star = np.asarray(x_star, dtype=np.float64)
        n = scenario.cluster.n
        num_mixed = min(n, max(0, math.ceil(n * float(x_star.sum()) - 1e-9)))
        p_solo = None
        if y_m is not None or y_s is not None:
            if y_m is None or y_s is None:
                raise ValueError("give both y_m and y_s (or neither)")
            r = scenario.rates
            fast = r.mu_s * np.asarray(y_s, dtype=np.float64)
            slow = r.mu_m * np.asarray(y_m, dtype=np.float64)
            den = fast + slow
            p_solo = np.where(den > 0, fast / np.where(den > 0, den, 1.0), 1.0)
        return cls(num_mixed=num_mixed, x_star=x_star, q_p_star=np.asarray(q_p_star), p_solo=p_solo)


# ---------------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class FinalState:
    """State at the horizon. Per-class arrays are int64; per-GPU tuples are indexed by GPU."""

    time: float
    Q_p: np.ndarray
    X: np.ndarray
    Q_d: np.ndarray
    Y_m: np.ndarray
    Y_s: np.ndarray
    gpu_group: tuple[str, ...]
    gpu_prefill_class: tuple[int, ...]  # -1: no prefill running
    gpu_decodes: tuple[tuple[int, ...], ...]  # per GPU, decodes per class
    decode_buffers: dict  # buffer name -> per-class queue lengths

    @property
    def in_system(self) -> np.ndarray:
        return self.Q_p + self.X + self.Q_d + self.Y_m + self.Y_s


@dataclasses.dataclass(frozen=True, eq=False)
class Conservation:
    """Whole-run counters [0, horizon], per class: arrivals = abandon_prefill + abandon_decode +
    decode_completions + in_system (the system starts empty)."""

    arrivals: np.ndarray
    abandon_prefill: np.ndarray
    abandon_decode: np.ndarray
    prefill_completions: np.ndarray
    decode_completions: np.ndarray
    in_system: np.ndarray

    def balance(self) -> np.ndarray:
        """arrivals - (abandoned + completed + in system); zero when jobs are conserved."""
        return self.arrivals - (self.abandon_prefill + self.abandon_decode + self.decode_completions
                                + self.in_system)


@dataclasses.dataclass(frozen=True, eq=False)
class ReferenceResult:
    """Output of :func:`simulate_reference`. Counters, time averages and revenue are over the window
    [warmup, horizon] (length ``window``); ``conservation`` is over the whole run.

    Counters (int64, per class): ``arrivals``, ``arrivals_waited`` (arrivals not admitted to prefill at
    their own arrival epoch), ``prefill_admissions``, ``prefill_completions``, ``decode_admissions``
    (placements on a GPU, also the immediate ones), ``decode_completions``, ``abandon_prefill``,
    ``abandon_decode`` (all decode buffers).

    Time averages (float64, per class): ``avg_Q_p``, ``avg_X``, ``avg_Q_d`` (all buffers), ``avg_Y_m``
    (decodes on GPUs running a prefill), ``avg_Y_s`` (the other decodes).

    ``prefill_wait_sum`` / ``decode_wait_sum``: total waiting time (from entering the queue) of the
    jobs that left the prefill queue / decode buffer(s) in the window, by admission or abandonment; the
    numbers of such jobs are admissions + abandonments.

    Revenue per GPU per second: ``revenue_bundled`` (w_i per decode completion) and
    ``revenue_separate`` (c_p P_i per prefill completion + c_d D_i per decode completion).
    """

    policy: str
    convention: str
    n: int
    horizon: float
    warmup: float
    seed: int
    options: dict
    num_events: int
    num_events_window: int
    wall_seconds: float
    arrivals: np.ndarray
    arrivals_waited: np.ndarray
    prefill_admissions: np.ndarray
    prefill_completions: np.ndarray
    decode_admissions: np.ndarray
    decode_completions: np.ndarray
    abandon_prefill: np.ndarray
    abandon_decode: np.ndarray
    avg_Q_p: np.ndarray
    avg_X: np.ndarray
    avg_Q_d: np.ndarray
    avg_Y_m: np.ndarray
    avg_Y_s: np.ndarray
    prefill_wait_sum: np.ndarray
    decode_wait_sum: np.ndarray
    revenue_bundled: float
    revenue_separate: float
    in_system_at_warmup: np.ndarray
    final: FinalState
    conservation: Conservation

    @property
    def window(self) -> float:
        return self.horizon - self.warmup

    @property
    def events_per_second(self) -> float:
        return self.num_events / self.wall_seconds if self.wall_seconds > 0 else float("inf")

    def metrics(self) -> dict[str, np.ndarray]:
        """Scalar or per-class float64 metrics, keyed by name, for :func:`replicate_reference`.
        Rates are per second for the whole cluster; ``*_per_gpu`` divide by n."""
        T = self.window
        f = lambda a: np.asarray(a, dtype=np.float64)  # noqa: E731
        out = {name: f(getattr(self, name)) / T for name in COUNTERS}
        out = {f"rate_{k}": v for k, v in out.items()}
        for name in ("avg_Q_p", "avg_X", "avg_Q_d", "avg_Y_m", "avg_Y_s"):
            out[name] = f(getattr(self, name))
        arr = f(self.arrivals)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["frac_abandon_prefill"] = np.where(arr > 0, f(self.abandon_prefill) / arr, np.nan)
            out["frac_abandon"] = np.where(
                arr > 0, (f(self.abandon_prefill) + f(self.abandon_decode)) / arr, np.nan)
            out["frac_waited"] = np.where(arr > 0, f(self.arrivals_waited) / arr, np.nan)
        out["revenue_bundled"] = np.float64(self.revenue_bundled)
        out["revenue_separate"] = np.float64(self.revenue_separate)
        return out


# ---------------------------------------------------------------------------------------------------
# The simulation state and its only mutators
# ---------------------------------------------------------------------------------------------------
class _Sim:
    """Mutable state. The per-GPU fields (``pf``, ``dec``) are the truth; the per-class aggregates
    (``X``, ``Ym``, ``Ys``, ``Yslow``, ``Yfast``) are updated only through ``_attach``/``_detach``,
    i.e. by subtracting a GPU's contribution, changing the GPU, and adding it back. In debug mode they
    are recomputed from scratch after every event and compared."""

    def __init__(self, scenario: Scenario, rule: "_Rule", targets, convention, rng, warmup, opts):
        self.n = scenario.cluster.n
        self.I = scenario.num_classes
        self.B = scenario.cluster.B
        rates = scenario.rates
        self.arrival_rate = [self.n * float(v) for v in scenario.classes.lam]
        self.theta = [float(v) for v in scenario.classes.theta]
        self.mu_p = [float(v) for v in rates.mu_p]
        self.mu_m = [float(v) for v in rates.mu_m]
        self.mu_s = [float(v) for v in rates.mu_s]
        self.ratio = [float(d / p) for d, p in zip(scenario.classes.D, scenario.classes.P)]  # D_i/P_i
        self.targets = targets
        self.rule = rule
        self.convention = convention
        self.rng = rng
        self.warmup = warmup
        self.opts = opts
        self.t = 0.0
        I = self.I
        self.group = rule.gpu_groups(self.n, targets)
        self.mix_gpus = [g for g in range(self.n) if self.group[g] == "mix"]
        self.solo_gpus = [g for g in range(self.n) if self.group[g] == "solo"]
        self.pf = [-1] * self.n
        self.dec = [[0] * I for _ in range(self.n)]
        self.qp = [[] for _ in range(I)]  # per class, FCFS list of (arrival_time, job_id)
        self.buffers = {b: [[] for _ in range(I)] for b in rule.buffer_names}  # (seq, entry_time)
        self.X = [0] * I
        self.Ym = [0] * I
        self.Ys = [0] * I
        self.Yslow = [0] * I
        self.Yfast = [0] * I
        self.next_job_id = 0
        self.next_seq = 0
        self.window = {c: [0] * I for c in COUNTERS}
        self.total = {c: [0] * I for c in COUNTERS}
        self.prefill_wait_sum = [0.0] * I
        self.decode_wait_sum = [0.0] * I

    # -- predicates --------------------------------------------------------------------------------
    def is_slow(self, g: int) -> bool:
        """Does GPU g run its decodes at mu_m (True) or mu_s (False)?"""
        if self.convention == "A" and self.group[g] != "any":
            return self.group[g] == "mix"
        return self.pf[g] >= 0

    def can_start_prefill(self, g: int) -> bool:
        if self.pf[g] >= 0:
            return False
        grp = self.group[g]
        if grp == "mix":
            return True  # the prefill slot is reserved; decodes never exceed B-1
        if grp == "solo":
            return False
        return sum(self.dec[g]) < self.B  # "any": B jobs in total

    def has_free_decode_slot(self, g: int) -> bool:
        load = sum(self.dec[g])
        grp = self.group[g]
        if grp == "mix":
            return load < self.B - 1
        if grp == "solo":
            return load < self.B
        return load + (1 if self.pf[g] >= 0 else 0) < self.B

    # -- aggregates ---------------------------------------------------------------------------------
    def _contribute(self, g: int, sign: int) -> None:
        if self.pf[g] >= 0:
            self.X[self.pf[g]] += sign
        by_status = self.Ym if self.pf[g] >= 0 else self.Ys
        by_rate = self.Yslow if self.is_slow(g) else self.Yfast
        for j, d in enumerate(self.dec[g]):
            by_status[j] += sign * d
            by_rate[j] += sign * d

    # -- the four GPU mutators ----------------------------------------------------------------------
    def start_prefill(self, g: int, i: int) -> None:
        assert self.can_start_prefill(g), f"GPU {g} cannot start a prefill"
        self._contribute(g, -1)
        self.pf[g] = i
        self._contribute(g, +1)

    def finish_prefill(self, g: int) -> int:
        i = self.pf[g]
        assert i >= 0
        self._contribute(g, -1)
        self.pf[g] = -1
        self._contribute(g, +1)
        return i

    def add_decode(self, g: int, j: int) -> None:
        assert self.has_free_decode_slot(g), f"GPU {g} has no free decode slot"
        self._contribute(g, -1)
        self.dec[g][j] += 1
        self._contribute(g, +1)

    def remove_decode(self, g: int, j: int) -> None:
        assert self.dec[g][j] > 0
        self._contribute(g, -1)
        self.dec[g][j] -= 1
        self._contribute(g, +1)

    # -- bookkeeping ----------------------------------------------------------------------------------
    def count(self, name: str, i: int) -> None:
        self.total[name][i] += 1
        if self.t >= self.warmup:
            self.window[name][i] += 1

    def q_d(self, i: int) -> int:
        return sum(len(buf[i]) for buf in self.buffers.values())

    def choose(self, candidates: list[int]) -> int:
        return candidates[self.rng.randrange(len(candidates))]

    # -- job movements used by the policies ------------------------------------------------------------
    def admit_prefill(self, i: int, g: int) -> None:
        """Move the head-of-line class-i job of the prefill queue into prefill on GPU g."""
        arrival, _ = self.qp[i].pop(0)
        self.start_prefill(g, i)
        self.count("prefill_admissions", i)
        if self.t >= self.warmup:
            self.prefill_wait_sum[i] += self.t - arrival

    def enter_buffer(self, buffer: str, i: int) -> None:
        self.buffers[buffer][i].append((self.next_seq, self.t))
        self.next_seq += 1

    def buffer_head_class(self, buffer: str) -> int | None:
        """The class of the job that entered ``buffer`` first (FCFS across classes), or None."""
        best, best_seq = None, None
        for i, q in enumerate(self.buffers[buffer]):
            if q and (best_seq is None or q[0][0] < best_seq):
                best, best_seq = i, q[0][0]
        return best

    def place_from_buffer(self, buffer: str, i: int, g: int) -> None:
        """Move the head-of-line class-i job of ``buffer`` into decode on GPU g."""
        _, entry = self.buffers[buffer][i].pop(0)
        self.add_decode(g, i)
        self.count("decode_admissions", i)
        if self.t >= self.warmup:
            self.decode_wait_sum[i] += self.t - entry

    # -- debug checks -------------------------------------------------------------------------------------
    def check(self) -> None:
        """Every invariant, recomputed from scratch; raises AssertionError on the first violation."""
        I, n, B = self.I, self.n, self.B
        X, Ym, Ys, Yslow, Yfast = [0] * I, [0] * I, [0] * I, [0] * I, [0] * I
        for g in range(n):
            grp, p, d = self.group[g], self.pf[g], self.dec[g]
            assert all(v >= 0 for v in d), f"GPU {g}: negative decode count {d}"
            load = sum(d)
            if grp == "mix":
                assert load <= B - 1, f"mixed GPU {g} has {load} > B-1 decodes"
            elif grp == "solo":
                assert p < 0, f"solo GPU {g} runs a prefill"
                assert load <= B, f"solo GPU {g} has {load} > B decodes"
            else:
                assert grp == "any"
                assert load + (p >= 0) <= B, f"GPU {g} holds {load + (p >= 0)} > B jobs"
            if p >= 0:
                X[p] += 1
            for j in range(I):
                (Ym if p >= 0 else Ys)[j] += d[j]
                (Yslow if self.is_slow(g) else Yfast)[j] += d[j]
        assert X == self.X, (X, self.X)
        assert Ym == self.Ym and Ys == self.Ys, (Ym, self.Ym, Ys, self.Ys)
        assert Yslow == self.Yslow and Yfast == self.Yfast, (Yslow, self.Yslow, Yfast, self.Yfast)
        assert sum(X) <= n and sum(Ym) <= (B - 1) * sum(X) and sum(Ys) <= B * (n - sum(X))
        for i in range(I):
            times = [a for a, _ in self.qp[i]]
            assert times == sorted(times), "prefill queue not FCFS"
            in_system = len(self.qp[i]) + X[i] + self.q_d(i) + Ym[i] + Ys[i]
            tot = self.total
            assert tot["arrivals"][i] == (tot["abandon_prefill"][i] + tot["abandon_decode"][i]
                                          + tot["decode_completions"][i] + in_system), "conservation"
            assert tot["arrivals"][i] == (tot["abandon_prefill"][i] + tot["prefill_admissions"][i]
                                          + len(self.qp[i])), "prefill-queue balance"
            assert tot["prefill_admissions"][i] == tot["prefill_completions"][i] + X[i], "X balance"
            assert tot["prefill_completions"][i] == (tot["decode_admissions"][i]
                                                     + tot["abandon_decode"][i] + self.q_d(i))
            assert tot["decode_admissions"][i] == tot["decode_completions"][i] + Ym[i] + Ys[i]
        self.rule.check_dispatch_complete(self)


# ---------------------------------------------------------------------------------------------------
# Gates: which class a free prefill slot admits (None = leave it idle)
# ---------------------------------------------------------------------------------------------------
def gate_xi(sim: _Sim) -> int | None:
    """xi gate (MODEL.md §5.1). Among classes with waiting jobs and x_i* > 0, admit the class with the
    smallest xi_i = (X_i - n x_i*) / x_i*; ties go to the largest Q_{p,i} - n q_{p,i}*, then to the
    lowest class index. Classes with x_i* = 0 are never admitted (xi = +inf). X and Q_p are the
    current values, so several admissions at one epoch see each other's effect."""
    x_star, q_star, n = sim.targets.x_star, sim.targets.q_p_star, sim.n
    best, best_key = None, None
    for i in range(sim.I):
        if not sim.qp[i] or x_star[i] <= 0.0:
            continue
        # xi_i = X_i/x_i* - n: order by X_i/x_i*, which keeps the exact ties at X_i = 0 exact
        # (computing (X_i - n x_i*)/x_i* would break them by per-class rounding noise)
        xi = sim.X[i] / x_star[i]
        key = (xi, -(len(sim.qp[i]) - n * q_star[i]))
        if best_key is None or key < best_key:  # strict: equal keys keep the lower index
            best, best_key = i, key
    return best


def gate_priority(sim: _Sim) -> int | None:
    """Static-priority gate (MODEL.md §5.2): among classes with waiting jobs, admit the class with the
    largest D_i / P_i; ties go to the lowest class index."""
    best = None
    for i in range(sim.I):
        if sim.qp[i] and (best is None or sim.ratio[i] > sim.ratio[best]):
            best = i
    return best


def gate_fcfs(sim: _Sim) -> int | None:
    """FCFS gate across classes: admit the waiting job that arrived first, whatever its class."""
    best = None
    for i in range(sim.I):
        if sim.qp[i] and (best is None or sim.qp[i][0][0] < sim.qp[best][0][0]):
            best = i
    return best


# ---------------------------------------------------------------------------------------------------
# Policies
# ---------------------------------------------------------------------------------------------------
class _Rule:
    """A policy: GPU groups, decode buffers, what happens at a prefill completion, and ``dispatch``,
    which is run after every event and fills every slot that the rule allows to fill."""

    name: str
    static_partition: bool
    buffer_names: tuple[str, ...]
    needs: tuple[str, ...] = ()  # targets fields the rule uses

    def gpu_groups(self, n, targets) -> list[str]:
        if self.static_partition:
            m = targets.num_mixed
            return ["mix"] * m + ["solo"] * (n - m)
        return ["any"] * n

    def gate(self, sim: _Sim) -> int | None:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_prefill_completion(self, sim: _Sim, g: int, i: int) -> None:  # pragma: no cover
        raise NotImplementedError

    def dispatch(self, sim: _Sim) -> None:  # pragma: no cover
        raise NotImplementedError

    def check_dispatch_complete(self, sim: _Sim) -> None:  # pragma: no cover
        raise NotImplementedError

    # helpers shared by the rules -------------------------------------------------------------------
    def _prefill_candidates(self, sim: _Sim) -> list[int]:
        """GPUs on which a prefill may start now."""
        gpus = sim.mix_gpus if self.static_partition else range(sim.n)
        cands = [g for g in gpus if sim.can_start_prefill(g)]
        cap = sim.opts["wsp_max_prefills"]
        if cap is not None and not self.static_partition and sum(sim.X) >= cap:
            return []
        return cands

    def _fill_prefill_slots(self, sim: _Sim) -> None:
        """While a prefill can start somewhere and the gate names a class, admit that class's HOL job
        on a GPU chosen among the candidates (uniformly at random, or the lowest index under
        ``prefill_gpu="first"``)."""
        while True:
            i = self.gate(sim)  # a pure function of the state: asking it first only saves time
            if i is None:
                return
            cands = self._prefill_candidates(sim)
            if not cands:
                return
            g = cands[0] if sim.opts["prefill_gpu"] == "first" else sim.choose(cands)
            sim.admit_prefill(i, g)

    def _check_prefill_complete(self, sim: _Sim) -> None:
        assert not (self._prefill_candidates(sim) and self.gate(sim) is not None), \
            "a prefill slot could be filled but was left idle"


class _GreedyRouterMixin:
    """Greedy, decode-first router (MODEL.md §5.1), one FCFS buffer across classes ("shared")."""

    buffer_names = ("shared",)

    def on_prefill_completion(self, sim, g, i):
        """The job joins the back of the shared buffer; ``dispatch`` then places it at once if a slot
        is free (the buffer is non-empty only when no decode slot is free, so this is the same as
        routing the job directly)."""
        sim.enter_buffer("shared", i)

    def _route_buffer(self, sim):
        """While the buffer is non-empty: take its HOL job (FCFS across classes); place it uniformly at
        random among G_solo GPUs with a free slot; if there is none, uniformly among G_mix GPUs with a
        free decode slot (fewer than B-1 decodes); if there is none either, stop."""
        while True:
            i = sim.buffer_head_class("shared")
            if i is None:
                return
            cands = [g for g in sim.solo_gpus if sim.has_free_decode_slot(g)]
            if not cands:
                cands = [g for g in sim.mix_gpus if sim.has_free_decode_slot(g)]
            if not cands:
                return
            sim.place_from_buffer("shared", i, sim.choose(cands))

    def dispatch(self, sim):
        self._route_buffer(sim)
        self._fill_prefill_slots(sim)

    def check_dispatch_complete(self, sim):
        if sim.buffer_head_class("shared") is not None:
            assert not any(sim.has_free_decode_slot(g) for g in range(sim.n)), "decode slot left idle"
        self._check_prefill_complete(sim)


class GateAndRoute(_GreedyRouterMixin, _Rule):
    """GG-SP, bundled gate-and-route (MODEL.md §5.1).

    * Groups: GPUs 0..M-1 are G_mix (M = targets.num_mixed), the rest G_solo.
    * Gate: whenever a G_mix GPU's prefill slot is idle and :func:`gate_xi` names a class, that class's
      HOL job starts prefill there (idle G_mix GPU chosen uniformly at random; option ``prefill_gpu``).
    * Router: at a prefill completion the job needs a decode slot: G_solo GPUs with a free slot first
      (uniformly at random), then G_mix GPUs with fewer than B-1 decodes (uniformly at random), else
      the single FCFS decode buffer across classes; a freed decode slot takes the buffer's HOL job by
      the same rule.
    """

    name = "gg-sp"
    static_partition = True
    needs = ("num_mixed", "x_star", "q_p_star")

    def gate(self, sim):
        return gate_xi(sim)


class PrioritizeAndRoute(_GreedyRouterMixin, _Rule):
    """Prioritize-and-route (separate charging, MODEL.md §5.2): GG-SP with the static-priority gate
    :func:`gate_priority` (largest D_i/P_i among classes with waiting jobs, ties to the lowest index;
    every class may be admitted, whatever its x_i*)."""

    name = "prioritize"
    static_partition = True
    needs = ("num_mixed",)

    def gate(self, sim):
        return gate_priority(sim)


class FCFSGateStaticPartition(_GreedyRouterMixin, _Rule):
    """FG-SP (MODEL.md §7.3): static partition and the greedy router of GG-SP, but the gate is FCFS
    across classes by arrival time (:func:`gate_fcfs`): an idle G_mix prefill slot takes the waiting
    job that arrived first, whatever its class."""

    name = "fg-sp"
    static_partition = True
    needs = ("num_mixed",)

    def gate(self, sim):
        return gate_fcfs(sim)


class SLIAwareGateAndRoute(_Rule):
    """SLI-aware gate-and-route (MODEL.md §5.3).

    * Groups and gate: as GG-SP (:func:`gate_xi` on G_mix prefill slots).
    * Router: at a class-i prefill completion draw U ~ Unif[0, 1); the target group is G_solo if
      U < p_{s,i} (targets.p_solo), else G_mix. The job joins the back of that group's FCFS buffer
      ("solo" or "mix", FCFS across classes); ``dispatch`` places it at once, uniformly at random among
      the group's GPUs with a free decode slot, if there is one. A freed decode slot in a group takes
      the HOL job of that group's buffer. Jobs never move between the two buffers.
    """

    name = "sli"
    static_partition = True
    buffer_names = ("solo", "mix")
    needs = ("num_mixed", "x_star", "q_p_star", "p_solo")

    def gate(self, sim):
        return gate_xi(sim)

    def on_prefill_completion(self, sim, g, i):
        u = sim.rng.random()
        sim.enter_buffer("solo" if u < sim.targets.p_solo[i] else "mix", i)

    def dispatch(self, sim):
        for buffer, gpus in (("solo", sim.solo_gpus), ("mix", sim.mix_gpus)):
            while True:
                i = sim.buffer_head_class(buffer)
                if i is None:
                    break
                cands = [g for g in gpus if sim.has_free_decode_slot(g)]
                if not cands:
                    break
                sim.place_from_buffer(buffer, i, sim.choose(cands))
        self._fill_prefill_slots(sim)

    def check_dispatch_complete(self, sim):
        for buffer, gpus in (("solo", sim.solo_gpus), ("mix", sim.mix_gpus)):
            if sim.buffer_head_class(buffer) is not None:
                assert not any(sim.has_free_decode_slot(g) for g in gpus), f"{buffer} slot left idle"
        self._check_prefill_complete(sim)


class _CoupledImmediate(_Rule):
    """Coupled "Immediate" placement (MODEL.md §7.3 [RECON]): every GPU is "any" (B slots, at most one
    prefill). A prefill may start on a GPU with a free slot and no active prefill (uniformly at random
    among those; option ``prefill_gpu``); at its completion the job's decode runs in that same slot on
    that same GPU (no decode buffer; Q_d stays 0), at mu_m while any prefill runs on the GPU, else
    mu_s."""

    static_partition = False
    buffer_names = ()

    def on_prefill_completion(self, sim, g, i):
        sim.add_decode(g, i)
        sim.count("decode_admissions", i)

    def dispatch(self, sim):
        self._fill_prefill_slots(sim)

    def check_dispatch_complete(self, sim):
        self._check_prefill_complete(sim)


class FIWSP(_CoupledImmediate):
    """FI-WSP: FCFS across classes by arrival time (:func:`gate_fcfs`, no gate), coupled Immediate
    placement (see :class:`_CoupledImmediate`)."""

    name = "fi-wsp"

    def gate(self, sim):
        return gate_fcfs(sim)


class GIWSP(_CoupledImmediate):
    """GI-WSP: the class is chosen by the xi gate (:func:`gate_xi`; x_i* = 0 classes never admitted),
    coupled Immediate placement (see :class:`_CoupledImmediate`)."""

    name = "gi-wsp"
    needs = ("x_star", "q_p_star")

    def gate(self, sim):
        return gate_xi(sim)


class GFWSP(_Rule):
    """GF-WSP: xi gate, decoupled decode placement, prefill-first, no static partition.

    * Every GPU is "any" (B slots in total, at most one prefill).
    * At a prefill completion the job joins the back of one FCFS decode buffer across classes.
    * ``dispatch`` first fills prefill slots exactly as the coupled baselines do (the xi gate picks the
      class; a GPU with a free slot and no active prefill, uniformly at random), and only then places
      buffered decodes, HOL first, on GPUs with a free slot: uniformly at random among all of them
      (option ``gf_decode_placement="uniform"``, default) or among those not running a prefill first
      (``"no_prefill_first"``). So a freed slot admits a new prefill before a waiting decode.
    """

    name = "gf-wsp"
    static_partition = False
    buffer_names = ("shared",)
    needs = ("x_star", "q_p_star")

    def gate(self, sim):
        return gate_xi(sim)

    def on_prefill_completion(self, sim, g, i):
        sim.enter_buffer("shared", i)

    def dispatch(self, sim):
        self._fill_prefill_slots(sim)
        while True:
            i = sim.buffer_head_class("shared")
            if i is None:
                return
            cands = [g for g in range(sim.n) if sim.has_free_decode_slot(g)]
            if sim.opts["gf_decode_placement"] == "no_prefill_first":
                cands = [g for g in cands if sim.pf[g] < 0] or cands
            if not cands:
                return
            sim.place_from_buffer("shared", i, sim.choose(cands))

    def check_dispatch_complete(self, sim):
        self._check_prefill_complete(sim)
        if sim.buffer_head_class("shared") is not None:
            assert not any(sim.has_free_decode_slot(g) for g in range(sim.n)), "decode slot left idle"


_RULES = {r.name: r for r in (GateAndRoute, PrioritizeAndRoute, SLIAwareGateAndRoute, FIWSP, GIWSP,
                              GFWSP, FCFSGateStaticPartition)}


def _resolve_policy(policy: str) -> str:
    key = str(policy).lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in _RULES:
        raise ValueError(f"policy must be one of {', '.join(POLICIES)}, got {policy!r}")
    return key


# ---------------------------------------------------------------------------------------------------
# The event loop
# ---------------------------------------------------------------------------------------------------
def _apply_event(sim: _Sim, kind: str, i: int, buffer: str | None) -> None:
    """Apply one primitive transition of class i, then let the policy dispatch."""
    rng = sim.rng
    if kind == "arrival":
        job_id = sim.next_job_id
        sim.next_job_id += 1
        sim.qp[i].append((sim.t, job_id))
        sim.count("arrivals", i)
        sim.rule.dispatch(sim)
        if sim.qp[i] and sim.qp[i][-1][1] == job_id:
            sim.count("arrivals_waited", i)
        return
    if kind == "abandon_prefill":  # each waiting class-i job has the same hazard theta_i
        arrival, _ = sim.qp[i].pop(rng.randrange(len(sim.qp[i])))
        sim.count("abandon_prefill", i)
        if sim.t >= sim.warmup:
            sim.prefill_wait_sum[i] += sim.t - arrival
    elif kind == "abandon_decode":
        queue = sim.buffers[buffer][i]
        _, entry = queue.pop(rng.randrange(len(queue)))
        sim.count("abandon_decode", i)
        if sim.t >= sim.warmup:
            sim.decode_wait_sum[i] += sim.t - entry
    elif kind == "prefill_completion":  # each class-i prefill completes at rate mu_p,i
        k = rng.randrange(sim.X[i])
        g = [h for h in range(sim.n) if sim.pf[h] == i][k]
        sim.finish_prefill(g)
        sim.count("prefill_completions", i)
        sim.rule.on_prefill_completion(sim, g, i)
    elif kind in ("decode_completion_slow", "decode_completion_fast"):
        slow = kind == "decode_completion_slow"
        # each class-i decode at this rate completes with the same hazard: pick one uniformly,
        # i.e. a GPU with probability proportional to its number of such decodes
        k = rng.randrange(sim.Yslow[i] if slow else sim.Yfast[i])
        for g in range(sim.n):
            if sim.is_slow(g) == slow:
                if k < sim.dec[g][i]:
                    break
                k -= sim.dec[g][i]
        else:  # pragma: no cover
            raise AssertionError("decode completion: no GPU found")
        sim.remove_decode(g, i)
        sim.count("decode_completions", i)
    else:  # pragma: no cover
        raise AssertionError(kind)
    sim.rule.dispatch(sim)


def _enabled_transitions(sim: _Sim) -> list[tuple[float, str, int, str | None]]:
    out = []
    for i in range(sim.I):
        out.append((sim.arrival_rate[i], "arrival", i, None))
        out.append((sim.theta[i] * len(sim.qp[i]), "abandon_prefill", i, None))
        for b, queues in sim.buffers.items():
            out.append((sim.theta[i] * len(queues[i]), "abandon_decode", i, b))
        out.append((sim.mu_p[i] * sim.X[i], "prefill_completion", i, None))
        out.append((sim.mu_m[i] * sim.Yslow[i], "decode_completion_slow", i, None))
        out.append((sim.mu_s[i] * sim.Yfast[i], "decode_completion_fast", i, None))
    return out


def simulate_reference(
    scenario: Scenario,
    policy: str,
    targets: PolicyTargets | None,
    *,
    horizon: float,
    warmup: float,
    seed: int,
    convention: str = "B",
    prefill_gpu: str = "uniform",
    gf_decode_placement: str = "uniform",
    wsp_max_prefills: int | None = None,
    debug: bool = False,
) -> ReferenceResult:
    """Simulate ``scenario`` under ``policy`` from an empty system over [0, horizon].

    Args:
        scenario: the model instance (n, B, classes, rates, prices).
        policy: one of ``"gg-sp"``, ``"prioritize"``, ``"sli"``, ``"fi-wsp"``, ``"gi-wsp"``,
            ``"gf-wsp"``, ``"fg-sp"`` (see the rule classes' docstrings).
        targets: static-planning outputs (:class:`PolicyTargets`); may be None for ``"fi-wsp"``.
        horizon, warmup: statistics cover [warmup, horizon]; 0 <= warmup < horizon.
        seed: seeds ``random.Random``, the only source of randomness.
        convention: decode-rate convention, ``"B"`` (default: mu_m while the GPU runs a prefill) or
            ``"A"`` (mu_m on G_mix, mu_s on G_solo; falls back to B on "any" GPUs).
        prefill_gpu: which GPU a gated prefill goes to when several can take it: ``"uniform"``
            (default, uniformly at random) or ``"first"`` (lowest index).
        gf_decode_placement: GF-WSP only: ``"uniform"`` (default) among all GPUs with a free slot,
            or ``"no_prefill_first"`` (GPUs not running a prefill first).
        wsp_max_prefills: gi-wsp / gf-wsp / fi-wsp only: cap on concurrent prefills (None, default:
            no cap, any GPU may prefill).
        debug: check every invariant (capacity, aggregates, conservation, dispatch completeness)
            after every event; raises AssertionError on a violation.
    """
    key = _resolve_policy(policy)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be 'A' or 'B', got {convention!r}")
    if prefill_gpu not in ("uniform", "first"):
        raise ValueError(f"prefill_gpu must be 'uniform' or 'first', got {prefill_gpu!r}")
    if gf_decode_placement not in ("uniform", "no_prefill_first"):
        raise ValueError("gf_decode_placement must be 'uniform' or 'no_prefill_first', "
                         f"got {gf_decode_placement!r}")
    if wsp_max_prefills is not None and (isinstance(wsp_max_prefills, bool)
                                         or not isinstance(wsp_max_prefills, (int, np.integer))
                                         or wsp_max_prefills < 0):
        raise ValueError(f"wsp_max_prefills must be None or an integer >= 0, got {wsp_max_prefills!r}")
    horizon, warmup = float(horizon), float(warmup)
    if not (math.isfinite(horizon) and 0.0 <= warmup < horizon):
        raise ValueError(f"need 0 <= warmup < horizon < inf, got warmup={warmup}, horizon={horizon}")
    rule = _RULES[key]()
    n, I = scenario.cluster.n, scenario.num_classes
    if rule.needs:
        if targets is None:
            raise ValueError(f"policy {key!r} needs targets ({', '.join(rule.needs)})")
        for field in rule.needs:
            value = getattr(targets, field)
            if value is None:
                raise ValueError(f"policy {key!r} needs targets.{field}")
            if field != "num_mixed" and len(value) != I:
                raise ValueError(f"targets.{field} has {len(value)} entries, the scenario {I} classes")
        if "num_mixed" in rule.needs and targets.num_mixed > n:
            raise ValueError(f"targets.num_mixed must be <= n = {n}, got {targets.num_mixed}")
    opts = dict(prefill_gpu=prefill_gpu, gf_decode_placement=gf_decode_placement,
                wsp_max_prefills=None if wsp_max_prefills is None else int(wsp_max_prefills))

    rng = random.Random(seed)
    sim = _Sim(scenario, rule, targets, convention, rng, warmup, opts)
    names = ("Q_p", "X", "Q_d", "Y_m", "Y_s")
    integral = {k: [0.0] * I for k in names}
    in_system_at_warmup = None
    num_events = num_events_window = 0
    wall0 = _time.perf_counter()
    if debug:
        sim.check()

    def in_system():
        return [len(sim.qp[i]) + sim.X[i] + sim.q_d(i) + sim.Ym[i] + sim.Ys[i] for i in range(I)]

    while True:
        transitions = _enabled_transitions(sim)
        total = math.fsum(r for r, *_ in transitions)
        t_next = sim.t + rng.expovariate(total)
        # the state is constant on [t, t_next): integrate it over the part inside [warmup, horizon]
        lo, hi = max(sim.t, warmup), min(t_next, horizon)
        if hi > lo:
            dt = hi - lo
            for i in range(I):
                integral["Q_p"][i] += dt * len(sim.qp[i])
                integral["X"][i] += dt * sim.X[i]
                integral["Q_d"][i] += dt * sim.q_d(i)
                integral["Y_m"][i] += dt * sim.Ym[i]
                integral["Y_s"][i] += dt * sim.Ys[i]
        if in_system_at_warmup is None and t_next >= warmup:
            in_system_at_warmup = in_system()
        if t_next >= horizon:
            break
        sim.t = t_next
        u = rng.random() * total
        chosen = None
        for rate, kind, i, b in transitions:
            if rate > 0.0:
                chosen = (kind, i, b)
                if u < rate:
                    break
                u -= rate
        _apply_event(sim, *chosen)
        num_events += 1
        if sim.t >= warmup:
            num_events_window += 1
        if debug:
            sim.check()
    wall = _time.perf_counter() - wall0

    T = horizon - warmup
    arr = lambda v: np.asarray(v, dtype=np.int64)  # noqa: E731
    w = sim.window
    P, D = scenario.classes.P, scenario.classes.D
    c_p, c_d = scenario.pricing.c_p, scenario.pricing.c_d
    dc, pc = arr(w["decode_completions"]), arr(w["prefill_completions"])
    revenue_bundled = float(np.sum(scenario.w * dc)) / (n * T)
    revenue_separate = float(np.sum(c_p * P * pc + c_d * D * dc)) / (n * T)
    final = FinalState(
        time=horizon,
        Q_p=arr([len(q) for q in sim.qp]), X=arr(sim.X), Q_d=arr([sim.q_d(i) for i in range(I)]),
        Y_m=arr(sim.Ym), Y_s=arr(sim.Ys), gpu_group=tuple(sim.group), gpu_prefill_class=tuple(sim.pf),
        gpu_decodes=tuple(tuple(d) for d in sim.dec),
        decode_buffers={b: tuple(len(q) for q in qs) for b, qs in sim.buffers.items()},
    )
    tot = sim.total
    conservation = Conservation(
        arrivals=arr(tot["arrivals"]), abandon_prefill=arr(tot["abandon_prefill"]),
        abandon_decode=arr(tot["abandon_decode"]), prefill_completions=arr(tot["prefill_completions"]),
        decode_completions=arr(tot["decode_completions"]), in_system=final.in_system,
    )
    return ReferenceResult(
        policy=key, convention=convention, n=n, horizon=horizon, warmup=warmup, seed=seed, options=opts,
        num_events=num_events, num_events_window=num_events_window, wall_seconds=wall,
        **{name: arr(w[name]) for name in COUNTERS},
        avg_Q_p=np.asarray(integral["Q_p"]) / T, avg_X=np.asarray(integral["X"]) / T,
        avg_Q_d=np.asarray(integral["Q_d"]) / T, avg_Y_m=np.asarray(integral["Y_m"]) / T,
        avg_Y_s=np.asarray(integral["Y_s"]) / T,
        prefill_wait_sum=np.asarray(sim.prefill_wait_sum), decode_wait_sum=np.asarray(sim.decode_wait_sum),
        revenue_bundled=revenue_bundled, revenue_separate=revenue_separate,
        in_system_at_warmup=arr(in_system_at_warmup), final=final, conservation=conservation,
    )


# ---------------------------------------------------------------------------------------------------
# Replications and benchmark
# ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class ReplicatedReference:
    """Across-seed summary: for every key of :meth:`ReferenceResult.metrics`, the mean and the standard
    error of the mean (sample std with ddof=1 over sqrt(R)); ``results`` keeps each run."""

    seeds: tuple[int, ...]
    mean: dict
    se: dict
    results: tuple[ReferenceResult, ...]


def replicate_reference(
    scenario: Scenario,
    policy: str,
    targets: PolicyTargets | None,
    *,
    horizon: float,
    warmup: float,
    seeds: int | Sequence[int] = 5,
    base_seed: int = 0,
    **kwargs,
) -> ReplicatedReference:
    """Run :func:`simulate_reference` once per seed (``seeds`` = a count, giving base_seed,
    base_seed+1, ..., or an explicit list) and summarise each metric by its mean and standard error."""
    seed_list = (tuple(range(base_seed, base_seed + int(seeds))) if isinstance(seeds, (int, np.integer))
                 else tuple(int(s) for s in seeds))
    if len(seed_list) < 2:
        raise ValueError("need at least 2 seeds for a standard error")
    results = tuple(simulate_reference(scenario, policy, targets, horizon=horizon, warmup=warmup,
                                       seed=s, **kwargs) for s in seed_list)
    per_run = [r.metrics() for r in results]
    mean, se = {}, {}
    for k in per_run[0]:
        stack = np.stack([np.asarray(m[k], dtype=np.float64) for m in per_run])
        mean[k] = stack.mean(axis=0)
        se[k] = stack.std(axis=0, ddof=1) / math.sqrt(len(seed_list))
    return ReplicatedReference(seeds=seed_list, mean=mean, se=se, results=results)


def benchmark_reference(
    scenario: Scenario, policy: str, targets: PolicyTargets | None, *, horizon: float, seed: int = 0,
    **kwargs,
) -> dict:
    """Events per second of wall time of :func:`simulate_reference` (no warm-up, no debug). Returns
    ``{"n", "policy", "horizon", "events", "seconds", "events_per_second"}``; nothing is asserted."""
    res = simulate_reference(scenario, policy, targets, horizon=horizon, warmup=0.0, seed=seed,
                             **kwargs)
    return {"n": res.n, "policy": res.policy, "horizon": horizon, "events": res.num_events,
            "seconds": res.wall_seconds, "events_per_second": res.events_per_second}


__all__ = [
    "CONVENTIONS", "COUNTERS", "POLICIES", "Conservation", "FCFSGateStaticPartition", "FIWSP",
    "FinalState", "GFWSP", "GIWSP", "GateAndRoute", "PolicyTargets", "PrioritizeAndRoute",
    "ReferenceResult", "ReplicatedReference", "SLIAwareGateAndRoute", "benchmark_reference",
    "gate_fcfs", "gate_priority", "gate_xi", "replicate_reference", "simulate_reference",
]
