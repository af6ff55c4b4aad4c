"""How often each expert is picked, for real tokens: the router-mode Observer, so that every family's
routing (Ernie-4.5-VL's token-type split, Llama 4's router scores, padding) is read as scoring reads it."""

from __future__ import annotations

import math

import torch

from ..moe.spec import MoEBlock
from .observer import Observer


class ExpertUsage:
    """Context manager. Call `batch(modality)` before each forward; `totals()` are the counts so far."""

    def __init__(self, model: torch.nn.Module, blocks: list[MoEBlock]):
        self._observer = Observer(model, blocks, "router")

    def __enter__(self) -> ExpertUsage:
        self._observer.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._observer.__exit__(*exc)

    def batch(self, modality: torch.Tensor) -> None:
        self._observer.set_modality(modality)

    def totals(self) -> dict[str, torch.Tensor]:
        """Block key -> float64 [E] picks of text and image tokens so far (cpu)."""
        self._observer.flush()
        return {key: s.acc[:, :, 0].sum(0).cpu() for key, s in self._observer.stats.items()}


def usage_entropy(counts: torch.Tensor, n: int | None = None) -> float | None:
    """Entropy of the usage distribution, normalised by log(n) (n: the experts that can be picked)."""
    n = len(counts) if n is None else n
    total = counts.sum()
    if not total or n < 2:
        return None
    p = counts[counts > 0] / total
    return float(-(p * p.log()).sum() / math.log(n))
