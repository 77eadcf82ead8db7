"""Host-side metrics and summaries with confidence intervals."""

from .summary import Estimate, estimate, replica_metrics, status_report, summarize

__all__ = ["Estimate", "estimate", "replica_metrics", "status_report", "summarize"]
