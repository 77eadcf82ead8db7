"""Peer simulators the tests compare against (Ciw, a test dependency): one replica per seed, the
per-replica estimates returned as plain lists so that the caller states its tolerance in SEs."""

from __future__ import annotations


def ciw_mgc_replicas(c: int, lam: float, theta: float, horizon: float, warmup: float, seeds, service=None):
    """M/G/c+M in Ciw (unit-mean service; ``service`` a Ciw distribution, default exponential): per seed,
    the time-average queue length and the completion rate over (warmup, horizon)."""
    import ciw

    service = ciw.dists.Exponential(rate=1.0) if service is None else service
    queue, throughput = [], []
    for seed in seeds:
        net = ciw.create_network(arrival_distributions=[ciw.dists.Exponential(rate=lam)],
                                 service_distributions=[service], number_of_servers=[c],
                                 reneging_time_distributions=[ciw.dists.Exponential(rate=theta)])
        ciw.seed(seed)
        sim = ciw.Simulation(net, tracker=ciw.trackers.SystemPopulation())
        sim.simulate_until_max_time(horizon)
        probs = sim.statetracker.state_probabilities(observation_period=(warmup, horizon))
        queue.append(sum(max(k - c, 0) * p for k, p in probs.items()))
        done = [r for r in sim.get_all_records() if r.record_type == "service" and warmup <= r.exit_date <= horizon]
        throughput.append(len(done) / (horizon - warmup))
    return queue, throughput
