"""Exact properties of BANDITS.md §5.3 and the agreement with the plain NumPy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxq.bandits import algorithms as A
from jaxq.bandits import env as E
from jaxq.bandits.reference import RefAlgorithm, run_reference
from jaxq.bandits.rollout import rollout_actions, rollout_families

D = 10
SPEC = E.BanditSpec(d=D, K=20, covered=5, n0_max=2000)
REGIMES = {
    "aligned": dict(shift_kind="uncovered", mu_covered=100.0, mu_uncovered=1.0),
    "misaligned": dict(shift_kind="covered", shift_leak=0.0, mu_covered=1.0, mu_uncovered=100.0),
}
_rollout = jax.jit(rollout_actions, static_argnums=(1, 2))
T_EXACT = 300  # one horizon and one stack size (8) for the exact tests: one compilation
# Jitted once, instead of dispatching (and compiling) every primitive eagerly.
_make_problem = jax.jit(E.make_problem, static_argnums=1)
_sample_stream = jax.jit(E.sample_stream, static_argnums=(1, 3))


def _problem(seed, regime, dtype=jnp.float64, **env):
    params = E.EnvParams.make(**{**REGIMES[regime], **env}, dtype=dtype)
    k_problem, k_stream = jax.random.split(jax.random.PRNGKey(seed))
    return _make_problem(k_problem, SPEC, params), k_stream


def _stack(plist):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *plist)


def _all_variants(problem, T, c_beta=0.3, tau1=25):
    """Every algorithm of the library, certificates taken from the drawn problem."""
    kw = dict(c_beta=c_beta, sigma=float(problem.sigma))
    return {
        "oful": A.oful(D, **kw),
        "naive": A.naive_warm_start(D, **kw),
        "pooled_only": A.pooled_only(problem.cert_Minv, float(problem.cert_rho), **kw),
        "scalar": A.scalar_minucb(D, float(problem.shift_l2), **kw),
        "ellipsoidal": A.ellipsoidal_minucb(problem.cert_Minv, float(problem.cert_rho), **kw),
        "ellipsoidal_loose": A.ellipsoidal_minucb(problem.cert_Minv, 1.5 * float(problem.cert_rho), **kw),
        "learned": A.learned_minucb(D, T, tau1=tau1, S_off=1.51, **kw),
        "learned_box": A.learned_minucb(D, T, tau1=tau1, penalty="box", S_off=1.51, **kw),
    }


@pytest.mark.parametrize("regime", ["aligned", "misaligned"])
def test_vectorised_matches_numpy_reference(regime):
    """Same actions as the per-round NumPy implementation on the same stream, round by round, for every
    algorithm, over the first 300 rounds in float64; and the same UCBs and learned certificates."""
    T = T_EXACT
    problem, k_stream = _problem(3, regime)
    variants = _all_variants(problem, T)
    trace, states = _rollout(k_stream, SPEC, T, _stack(list(variants.values())), problem, 50)
    stream = _sample_stream(k_stream, SPEC, problem, T)
    used_pooled = []
    for i, (name, params) in enumerate(variants.items()):
        ref = run_reference(RefAlgorithm.from_params(params), problem.theta, problem.offline.G0,
                            problem.offline.Zy, *stream)
        arms = np.asarray(trace.arms[:, i])
        mismatch = np.flatnonzero(arms != ref.arms)
        assert mismatch.size == 0, f"{name}: first different action at round {mismatch[:1]}"
        np.testing.assert_array_equal(np.asarray(trace.pooled_used[:, i]), ref.pooled_used, err_msg=name)
        np.testing.assert_allclose(np.asarray(trace.regrets[:, i]), ref.regrets, rtol=0, atol=1e-12, err_msg=name)
        for ours, theirs in ((trace.ucb_on[:, i], ref.ucb_on), (trace.ucb_pool[:, i], ref.ucb_pool)):
            ours = np.asarray(ours)
            np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(theirs), err_msg=name)
            finite = np.isfinite(theirs)
            np.testing.assert_allclose(ours[finite], theirs[finite], rtol=1e-9, atol=1e-9, err_msg=name)
        if ref.cert_c is not None:
            # Budgets along the eigenvectors of G_0 with a positive (simple) eigenvalue; in the null space
            # of G_0 the basis is arbitrary and the penalty does not depend on it.
            evals = np.linalg.eigvalsh(np.asarray(problem.offline.G0))
            covered = evals > 1e-8 * evals.max()
            assert covered.sum() == SPEC.covered
            np.testing.assert_allclose(np.asarray(states.cert_c[i])[covered], ref.cert_c[covered], rtol=1e-9,
                                       err_msg=name)
        used_pooled.append(ref.pooled_used.any())
    # The comparison must cover both branches being chosen, not only the online one.
    assert any(used_pooled) and not all(used_pooled)


@pytest.mark.parametrize("regime", ["aligned", "misaligned"])
def test_infinite_radius_is_oful(regime):
    """ρ → ∞ (or M → 0, i.e. M^{-1} → ∞): Ellipsoidal-MINUCB takes OFUL's actions round by round."""
    T = T_EXACT
    for seed in range(3):
        problem, k_stream = _problem(seed, regime)
        kw = dict(c_beta=0.3, sigma=float(problem.sigma))
        rho = float(problem.cert_rho)
        plist = [A.oful(D, **kw), A.ellipsoidal_minucb(problem.cert_Minv, jnp.inf, **kw),
                 A.ellipsoidal_minucb(problem.cert_Minv, 1e12, **kw),
                 A.ellipsoidal_minucb(1e15 * problem.cert_Minv, rho, **kw),
                 A.ellipsoidal_minucb(problem.cert_Minv, rho, **kw)]
        plist += plist[:3]  # pad to the stack size of the other exact tests (same compilation)
        trace, _ = _rollout(k_stream, SPEC, T, _stack(plist), problem, 50)
        arms = np.asarray(trace.arms)
        for j in (1, 2, 3):
            np.testing.assert_array_equal(arms[:, j], arms[:, 0])
            assert not np.asarray(trace.pooled_used[:, j]).any()
        if regime == "aligned":  # the finite certificate does differ from OFUL, so the check has teeth
            assert (arms[:, 4] != arms[:, 0]).any()


@pytest.mark.parametrize("regime", ["aligned", "misaligned"])
def test_no_offline_data_every_variant_is_oful(regime):
    """With G_0 = 0 (n0 = 0) every MINUCB variant, the naive warm start and pooled-only are OFUL."""
    T = T_EXACT
    for seed in range(2):
        problem, k_stream = _problem(seed, regime, n0=0)
        assert float(jnp.abs(problem.offline.G0).max()) == 0.0
        variants = _all_variants(problem, T)
        trace, _ = _rollout(k_stream, SPEC, T, _stack(list(variants.values())), problem, 50)
        arms = np.asarray(trace.arms)
        for i, name in enumerate(variants):
            np.testing.assert_array_equal(arms[:, i], arms[:, 0], err_msg=name)


def test_gram_inverses_do_not_drift_in_float32():
    """float32: after 2049 rounds (the last 49 by rank-one updates only) the kept inverses and log-dets
    agree with an exact float64 recomputation to float32 accuracy; without the periodic refresh the
    rank-one updates alone are measurably less accurate."""
    T = 2049
    problem, k_stream = _problem(0, "aligned", dtype=jnp.float32, n0=2000)
    kw = dict(c_beta=0.3, sigma=0.5, dtype=jnp.float32)
    params = _stack([A.ellipsoidal_minucb(problem.cert_Minv, float(problem.cert_rho), **kw)])

    def errors(refresh_every):
        _, states = _rollout(k_stream, SPEC, T, params, problem, refresh_every)
        V = np.asarray(states.V[0], np.float64)
        W = V + np.asarray(problem.offline.G0, np.float64)
        out = []
        for inv, logdet, mat in ((states.Vinv[0], states.logdetV[0], V), (states.Winv[0], states.logdetW[0], W)):
            exact = np.linalg.inv(mat)
            rel = np.abs(np.asarray(inv, np.float64) - exact).max() / np.abs(exact).max()
            out.append((rel, abs(float(logdet) - np.linalg.slogdet(mat)[1])))
        return out

    with_refresh = errors(50)
    for rel, logdet_err in with_refresh:
        assert rel < 1e-4 and logdet_err < 1e-3, with_refresh
    without = errors(10**9)
    assert max(e[0] for e in without) > max(e[0] for e in with_refresh), (with_refresh, without)


def test_rank_one_updates_match_exact_float64():
    """Sherman-Morrison and the determinant lemma agree with a direct inverse and slogdet."""
    from jaxq.bandits._linalg import inv_logdet, rank_one_update

    rng = np.random.default_rng(0)
    A0 = np.eye(6) * 2.0
    inv, logdet = inv_logdet(jnp.asarray(A0))
    mat = A0.copy()
    for _ in range(200):
        x = rng.normal(size=6)
        x /= np.linalg.norm(x)
        inv, logdet = rank_one_update(inv, logdet, jnp.asarray(x))
        mat += np.outer(x, x)
    np.testing.assert_allclose(np.asarray(inv), np.linalg.inv(mat), atol=1e-12)
    assert abs(float(logdet) - np.linalg.slogdet(mat)[1]) < 1e-10


_rollout_families = jax.jit(rollout_families, static_argnums=(1, 2, 3))


@functools.partial(jax.jit, static_argnums=(3, 4))
def _sup_trace(key, p, problem, stages, T):
    """Per-round (arm, updated stage) of one SupLinUCB-family algorithm, refreshed every 50 rounds."""
    from jaxq.bandits import suplinucb as SU

    state = SU.init(p, problem.offline, stages)

    def step(state, t):
        draw = E.draw_round(E.round_key(key, t), SPEC, problem)
        arm, info = SU.act(draw.tie_key, p, state, draw.contexts)
        r = draw.contexts[arm] @ problem.theta + draw.noise
        state = SU.update(p, state, draw.contexts[arm], r, info.stage)
        state = jax.lax.cond((t + 1) % 50 == 0, SU.refresh, lambda p, s: s, p, state)
        return state, (arm, info.stage)

    return jax.lax.scan(step, state, jnp.arange(T))[1]


@pytest.mark.parametrize("regime", ["aligned", "misaligned"])
def test_suplinucb_matches_numpy_reference(regime):
    """SupLinUCB and its MINUCB version (§3.2): same actions and same updated stages as the per-round
    NumPy implementation over the first 300 rounds of the same stream, run through the experiment rollout
    (rollout_families) next to OFUL."""
    from jaxq.bandits import suplinucb as SU
    from jaxq.bandits.reference import RefSup, run_reference_sup
    from jaxq.bandits.rollout import MinUCBFamily, RunSpec, SupFamily

    T, K = T_EXACT, SPEC.K
    stages = SU.num_stages(T)
    problem, k_stream = _problem(3, regime)
    plist = [SU.sup_params(D, T, K, c_beta=0.3),
             SU.sup_params(D, T, K, c_beta=0.3, use_pooled=True, rho=float(problem.cert_rho),
                           Minv=problem.cert_Minv)]
    run = RunSpec(T=T, record_every=50)
    families = (MinUCBFamily(), SupFamily(stages))
    params = (_stack([A.oful(D, c_beta=0.3)]), _stack(plist))
    records, _ = _rollout_families(k_stream, SPEC, run, families, params, problem)
    stream = _sample_stream(k_stream, SPEC, problem, T)
    used_pooled = False
    for i, params_i in enumerate(plist):
        arms, upd, regrets = run_reference_sup(RefSup.from_params(params_i), stages, problem.theta,
                                               problem.offline.G0, problem.offline.Zy, *stream)
        # Cumulative regret at every block end equals the reference's (per-round actions are compared via
        # the trace below).
        cum = np.cumsum(regrets)[run.record_every - 1::run.record_every]
        np.testing.assert_allclose(np.asarray(records.regret[:, 1 + i]), cum, rtol=1e-10)
        assert (upd >= 0).any() and (upd > 0).any()  # several stages take part
        used_pooled |= bool(np.asarray(records.pooled[:, 1 + i]).sum() > 0)

        # Round-by-round actions.
        ours_arms, ours_stage = _sup_trace(k_stream, params_i, problem, stages, T)
        np.testing.assert_array_equal(np.asarray(ours_arms), arms)
        np.testing.assert_array_equal(np.asarray(ours_stage), upd)
    assert used_pooled

    # Without offline data the MINUCB version of SupLinUCB is SupLinUCB.
    problem0, _ = _problem(3, regime, n0=0)
    pooled0 = SU.sup_params(D, T, K, c_beta=0.3, use_pooled=True, rho=float(problem.cert_rho),
                            Minv=problem.cert_Minv)
    np.testing.assert_array_equal(np.asarray(_sup_trace(k_stream, pooled0, problem0, stages, T)[0]),
                                  np.asarray(_sup_trace(k_stream, plist[0], problem0, stages, T)[0]))
