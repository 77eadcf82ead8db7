"""Real workloads: read an LLM request trace, summarise it, fit the model's job classes to it
(docs/traces.md). Host-side NumPy/SciPy; nothing here imports JAX at module level."""

from .fit import ClassFit, TraceFit, choose_num_classes, fit_trace, kmeans_log_lengths, scenario_toml
from .reader import Trace, read_trace
from .summary import TraceSummary, plot_summary, summarize

__all__ = [
    "ClassFit", "Trace", "TraceFit", "TraceSummary", "choose_num_classes", "fit_trace", "kmeans_log_lengths",
    "plot_summary", "read_trace", "scenario_toml", "summarize",
]
