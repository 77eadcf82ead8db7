"""Fixtures of the trace tests; they live in trace_helpers.py beside this file."""

from trace_helpers import azure_path, three_class_file  # noqa: F401  (registers the fixtures)
