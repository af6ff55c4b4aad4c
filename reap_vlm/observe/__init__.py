"""Hooks and float64 accumulators that turn the model's own forward into per-expert statistics."""

from .kernel import all_expert_norms
from .observer import Observer
from .stats import BlockStats

__all__ = ["BlockStats", "Observer", "all_expert_norms"]
