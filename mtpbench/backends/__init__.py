"""Backends other than the reference decoder: inference servers measured over their OpenAI-compatible API."""

from .server import Endpoint, SpecCounters, parse_spec_counters, run_server_sweep

__all__ = ["Endpoint", "SpecCounters", "parse_spec_counters", "run_server_sweep"]
