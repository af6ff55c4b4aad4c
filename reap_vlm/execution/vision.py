"""Qwen3-VL's vision attention with one SDPA call per image size instead of one per image.

With SDPA, transformers' Qwen3-VL vision attention splits the packed patches by image (`lengths.tolist()`,
a host sync in every block) and calls SDPA once per image: a batch of 117 small images runs 27 x 117
attention calls, each a few kernel launches and their Python. Flash attention instead gets the whole
packed sequence with its boundaries (cu_seqlens) in one call. This registers an attention function for that
single call (transformers' AttentionInterface; its name contains "flash" because that is how the vision
attention chooses the single-call path) which groups the images by patch count and runs transformers' own
sdpa_attention_forward once per group on [images, heads, patches, head_dim]: each image attends only to
itself, as before, with the same SDPA function and arguments (tests/test_scoring.py: the vision tower's
output equal bit for bit on the CPU). The vision tower is dense and not scored; nothing else changes.
"""

from __future__ import annotations

import itertools

import torch

GROUPED = "reap_flash_grouped_sdpa"  # "flash" in the name: the vision attention then passes cu_seqlens once
_CACHE: list = []  # [(cu_seqlens tensor, groups)]: one entry, the 27 blocks of a forward share the tensor
_HOST: list = []  # [(cu_seqlens on the device, its host copy)]: boundaries passed precomputed (remember_bounds)


def remember_bounds(on_device: torch.Tensor, on_host: torch.Tensor) -> None:
    """The host copy of precomputed attention boundaries moved to the device (execution.memory.prepare_inputs),
    so that _groups reads them without a device-to-host sync. The last two: an image and a video entry."""
    _HOST[:] = [*_HOST[-1:], (on_device, on_host)]


def _groups(cu_seqlens: torch.Tensor, device: torch.device) -> list[tuple[int, int, torch.Tensor]]:
    """(patches per image L, images n, patch positions [n*L] on device) per distinct image size; one host
    read of the boundaries per forward (the blocks get the same tensor), none when they were passed
    precomputed (remember_bounds)."""
    from ..observe.stats import to_device

    if _CACHE and _CACHE[0][0] is cu_seqlens:
        return _CACHE[0][1]
    host = next((h for d, h in _HOST if d is cu_seqlens), None)
    bounds = (cu_seqlens if host is None else host).tolist()
    by_length: dict[int, list[int]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    groups = []
    for length, starts in by_length.items():
        positions = (torch.tensor(starts)[:, None] + torch.arange(length)).reshape(-1)
        groups.append((length, len(starts), to_device(positions, device)))
    _CACHE[:] = [(cu_seqlens, groups)]
    return groups


def grouped_sdpa(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0, **kwargs):
    """query/key/value [1, heads, patches, head_dim] of all images packed; returns ([1, patches, heads,
    head_dim], None) like transformers' attention functions."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    cu_seqlens = kwargs.pop("cu_seq_lens_q")
    for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
        kwargs.pop(name, None)
    _, heads, total, dim = query.shape
    out = query.new_empty((total, heads, dim))
    for length, n, positions in _groups(cu_seqlens, query.device):

        def take(t, positions=positions, n=n, length=length):  # [n, heads, L, dim]
            return t[0].index_select(1, positions).view(heads, n, length, dim).transpose(0, 1)

        o, _ = sdpa_attention_forward(
            module, take(query), take(key), take(value), None, scaling=scaling, dropout=dropout, **kwargs
        )  # [n, L, heads, dim]
        out.index_copy_(0, positions, o.reshape(n * length, heads, dim))
    return out.unsqueeze(0), None


def group_vision_attention(model: torch.nn.Module) -> int:
    """Switch the Qwen3-VL vision attention modules that use SDPA to `grouped_sdpa`; returns how many."""
    modules = [
        m
        for m in model.modules()
        if type(m).__name__ in ("Qwen3VLVisionAttention", "Qwen3VLMoeVisionAttention")
        and getattr(getattr(m, "config", None), "_attn_implementation", None) in ("sdpa", GROUPED)
    ]
    if not modules:
        return 0
    from transformers import AttentionInterface

    AttentionInterface.register(GROUPED, grouped_sdpa)
    for m in modules:
        m.config._attn_implementation = GROUPED
    return len(modules)
