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
        weight = model.get_parameter(b.router_weight)
        rows = b.router_rows or b.num_experts
        if weight.shape[0] != rows:
            raise BugError(f"router weight {b.router_weight} {tuple(weight.shape)} does not have {rows} rows")
        mask = torch.zeros(rows, dtype=weight.dtype, device=weight.device)
        mask[drop] = float("-inf")
        masks[id(weight)] = mask
        for bias in _selection_biases(model, b, rows):
            biases.append((bias, drop, bias[..., drop].clone()))
            bias.data[..., drop] = float("-inf")
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
            bias.data[..., drop] = saved


def _selection_biases(model: torch.nn.Module, block: MoEBlock, rows: int) -> list[torch.Tensor]:
    """Per-expert biases that steer the selection (e_score_correction_bias, expert_bias, moe_statics,
    balancing biases): tensors named *bias* in the router or directly on the block, one entry per logit
    row. With the logit at -inf such a bias could still lift a removed expert into the top-k."""
    found: dict[int, torch.Tensor] = {}
    router = model.get_submodule(block.router)
    moe = model.get_submodule(block.block)
    members = [*router.named_parameters(), *router.named_buffers()]
    members += [*moe.named_parameters(recurse=False), *moe.named_buffers(recurse=False)]
    for name, t in members:
        if "bias" in name:
            if t.dim() in (1, 2) and t.shape[-1] == rows and t.is_floating_point():
                found[id(t)] = t
    return list(found.values())


def removed_from_kept(blocks: list[MoEBlock], kept: dict[str, list[int]]) -> dict[str, list[int]]:
    return {b.key: sorted(set(range(b.num_experts)) - set(kept[b.key])) for b in blocks if b.key in kept}
