"""Router masking: run the original model as if some experts did not exist.

Inside `masked(model, blocks, removed)` the removed experts' router logits are -inf (and their
e_score_correction_bias, where the router has one, is -inf too), so no token can pick them and the
softmax / top-k renormalisation runs over the kept experts only. That is exactly what pruning
does (ARCHITECTURE.md §4), so it is both the oracle for the pruner and a way to measure a plan
in seconds without writing a checkpoint.

Mechanism: router modules compute their logits with torch.nn.functional.linear on their own
weight; while the context is active that function is wrapped, and a call whose weight is a masked
router's weight gets the mask added to its output.
"""

from __future__ import annotations

import contextlib

import torch

from .errors import BugError
from .moe.spec import MoEBlock


@contextlib.contextmanager
def masked(model: torch.nn.Module, blocks: list[MoEBlock], removed: dict[str, list[int]]):
    """`removed`: block key ("layer.expert_set") -> original expert indices to mask out."""
    masks: dict[int, torch.Tensor] = {}
    biases: list[tuple[torch.Tensor, list[int], torch.Tensor]] = []
    for b in blocks:
        drop = removed.get(b.key) or []
        if not drop:
            continue
        router = model.get_submodule(b.router)
        weight = router.weight
        if weight.shape[0] != b.num_experts:
            raise BugError(f"router {b.router} weight {tuple(weight.shape)} is not [experts, hidden]")
        mask = torch.zeros(b.num_experts, dtype=weight.dtype, device=weight.device)
        mask[drop] = float("-inf")
        masks[id(weight)] = mask
        bias = getattr(router, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            biases.append((bias, drop, bias[..., drop].clone()))
            bias[..., drop] = float("-inf")
    original = torch.nn.functional.linear

    def linear(input, weight, bias=None):
        out = original(input, weight, bias)
        mask = masks.get(id(weight))
        return out if mask is None else out + mask

    torch.nn.functional.linear = linear
    try:
        yield
    finally:
        torch.nn.functional.linear = original
        for bias, drop, saved in biases:
            bias[..., drop] = saved


def removed_from_kept(blocks: list[MoEBlock], kept: dict[str, list[int]]) -> dict[str, list[int]]:
    return {b.key: sorted(set(range(b.num_experts)) - set(kept[b.key])) for b in blocks if b.key in kept}
