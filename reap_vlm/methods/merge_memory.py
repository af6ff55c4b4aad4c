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
    return merge.LayerExperts(w.gate, w.up, w.down, w.gate_bias, w.up_bias, w.down_bias)


@torch.no_grad()
def apply_merge(
    model: torch.nn.Module,
    blocks: list[MoEBlock],
    groups: dict[tuple[int, str], list[list[int]]],
    saliency: dict,
    acts: dict,
    *,
    router_mode: str = "centroid",
    pca_dim: int = merge.PCA_DIM,
) -> None:
    """Overwrite each merged group's centroid with the merged expert (and router row, `average`)."""
    for b in blocks:
        key = (b.layer, b.expert_set)
        multi = [g for g in groups[key] if len(g) > 1]
        if not multi:
            continue
        views = _views(model, b)
        act = acts.get(key)
        for m in merge.merge_layer(views, multi, saliency[key], act, pca_dim=pca_dim):
            c = m.centroid
            for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
                target, value = getattr(views, name), getattr(m, name)
                if target is not None:
                    target[c].copy_(value)
        if router_mode == "average":
            weight = model.get_parameter(b.router_weight)
            rows = merge.merged_router(weight.double(), multi, saliency[key], "average")
            for g, row in zip(multi, rows, strict=True):
                weight[g[0]].copy_(row)


@contextlib.contextmanager
def merged(model, blocks, groups, saliency, acts, *, router_mode="centroid", pca_dim=merge.PCA_DIM):
    """Temporarily the merged weights (restored on exit): for measuring a merge plan in the live model."""
    saved = []
    for b in blocks:
        saved += [(p, p.detach().clone()) for p in model.get_submodule(b.experts).parameters(recurse=False)]
        if router_mode == "average":
            p = model.get_parameter(b.router_weight)
            saved.append((p, p.detach().clone()))
    try:
        apply_merge(model, blocks, groups, saliency, acts, router_mode=router_mode, pca_dim=pca_dim)
        yield
    finally:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
