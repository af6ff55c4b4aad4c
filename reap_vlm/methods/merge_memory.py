"""Merging applied to a loaded model, in place: the reference the on-disk merge is tested against, and
the way a merge plan can be measured on held-out data without writing a checkpoint.

Every group's merged expert is written into its centroid's slot (through the canonical views of
moe.spec.expert_weights, so fused, transposed and per-family layouts are handled once); masking the other
members' router logits (masking.masked) then gives exactly the merged checkpoint's model."""

from __future__ import annotations

import contextlib

import torch

from ..moe.spec import MoEBlock, expert_weights
from . import merge


def _views(model: torch.nn.Module, block: MoEBlock) -> merge.LayerExperts:
    w = expert_weights(model.get_submodule(block.experts))
    if w.dequantize is not None:
        from ..errors import UnsupportedModelError

        raise UnsupportedModelError(
            "merged experts cannot be written into experts kept quantized",
            "the model was loaded with its routed experts quantized (a quantized checkpoint on a GPU)",
            "Measure merge plans on the dequantized model (load_model(..., keep_fp8_experts=False, "
            "keep_packed_experts=False))",
        )
    return merge.LayerExperts(w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias)


@torch.no_grad()
def prepare(
    model: torch.nn.Module,
    blocks: list[MoEBlock],
    groups: dict[tuple[int, str], list[list[int]]],
    saliency: dict,
    acts: dict,
    *,
    router_mode: str = "centroid",
    pca_dim: int = merge.PCA_DIM,
    device: str | torch.device = "cpu",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target, value) pairs: `target` a view of a centroid's slot in the model's parameters, `value` the
    merged weights in the parameter's dtype (kept on `device`; in pinned memory when that is the CPU and the
    model is on a GPU, so copying them in is a fast transfer). Computed once; applied by copying."""
    updates = []
    for b in blocks:
        key = (b.layer, b.expert_set)
        multi = [g for g in groups[key] if len(g) > 1]
        if not multi:
            continue
        views = _views(model, b)
        for m in merge.iter_merge_layer(views, multi, saliency[key], acts.get(key), pca_dim=pca_dim):
            for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
                target = getattr(views, name)
                if target is not None:
                    updates.append((target[m.centroid], _keep(getattr(m, name), target, device)))
        if router_mode == "average":
            weight = model.get_parameter(b.router_weight)
            rows = merge.merged_router(weight.double(), multi, saliency[key], "average")
            updates += [(weight[g[0]], _keep(row, weight, device)) for g, row in zip(multi, rows, strict=True)]
    return updates


def _keep(value: torch.Tensor, like: torch.Tensor, device) -> torch.Tensor:
    out = value.to(device, like.dtype)
    if out.device.type == "cpu" and like.device.type == "cuda":
        out = out.pin_memory()
    return out


@torch.no_grad()
def apply_merge(model, blocks, groups, saliency, acts, *, router_mode="centroid", pca_dim=merge.PCA_DIM) -> None:
    """Overwrite each merged group's centroid with the merged expert (and router row, `average`)."""
    for target, value in prepare(model, blocks, groups, saliency, acts, router_mode=router_mode, pca_dim=pca_dim):
        target.copy_(value)


@contextlib.contextmanager
def swapped(updates: list[tuple[torch.Tensor, torch.Tensor]]):
    """The merged weights in place while the context is active; the original values restored on exit. The
    originals are saved where the merged values are kept (the host, for the reap stage's merge candidate), so
    swapping adds nothing to the GPU's peak."""
    with torch.no_grad():
        saved = [target.detach().to(value.device, copy=True) for target, value in updates]
    try:
        with torch.no_grad():
            for target, value in updates:
                target.copy_(value)
        yield
    finally:
        with torch.no_grad():
            for (target, _), value in zip(updates, saved, strict=True):
                target.copy_(value)
