"""The test stage's held-out comparison, streamed: the original and the pruned model each run one decoder
layer at a time from their own shards (each a meta-device skeleton built from its own config, so the
pruned one has its own, smaller expert count), with the hidden-state cache, tiers and bounds of streamed
scoring (execution.stream).

1. The original is read outside its decoder layers (embeddings, vision tower, merger, final norm, head).
   The pruned checkpoint's parts there are compared with the original's (`same_outer`): the same tensor
   names, dtypes, shapes and sha256 of their bytes, and configs that differ only in keys that act inside
   the MoE blocks (expert counts, routing groups) and `reap_pruning`. When they are the same, the pruned
   model's are never read: every batch is captured once (embeddings, vision tower, deepstack features,
   M-RoPE position ids, masks) and the original's final norm and LM head make both models' logits. When
   they differ, each model reads and captures its own, and the report says why.
2. The original's layers, in order, each resident once (the next prefetched), every batch through it;
   then the pruned model's, the same way, under a router-mode observer of each layer's MoE blocks (expert
   usage). One model's decoder layers at a time: never more than two layers' weights resident.
3. From the last hidden states, the final norm and the LM head give the logits a chunk of positions at a
   time (candidates._token_metrics with the head), so [B, T, V] is never held; the rows are the ones the
   in-memory comparison makes from full logits.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import time
from pathlib import Path

import torch

from ..checkpoint.layout import COUNT_KEYS
from .stream import StreamedModel
from .weights import OUTER

# config keys that act only inside the MoE blocks (what prune rewrites), and the provenance prune adds
MOE_ONLY_KEYS = (*COUNT_KEYS, "n_group", "topk_group", "reap_pruning")
HASH_CHUNK = 16 * 2**20


def _without(node, keys):
    if isinstance(node, dict):
        return {k: _without(v, keys) for k, v in node.items() if k not in keys}
    if isinstance(node, list):
        return [_without(v, keys) for v in node]
    return node


def _sha256(path: Path, start: int, end: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        remaining = end - start
        while remaining:
            buf = fh.read(min(HASH_CHUNK, remaining))
            if not buf:
                break
            h.update(buf)
            remaining -= len(buf)
    return h.hexdigest()


def same_outer(original: StreamedModel, pruned: StreamedModel) -> tuple[bool, str]:
    """(identical?, why) for the two checkpoints' parts outside the decoder layers, verified from the files:
    the on-disk tensors of those parts by name, dtype, shape and sha256 of their bytes, and the configs
    apart from MOE_ONLY_KEYS."""
    a, b = original.reader, pruned.reader
    names_a, names_b = sorted(a.groups[OUTER]), sorted(b.groups[OUTER])
    if names_a != names_b:
        only = sorted(set(names_a) ^ set(names_b))
        return False, f"the tensors outside the decoder layers differ ({only[0]} is in one checkpoint only)"
    config_a = _without(copy.deepcopy(a.layout.config), MOE_ONLY_KEYS)
    config_b = _without(copy.deepcopy(b.layout.config), MOE_ONLY_KEYS)
    if config_a != config_b:
        keys = sorted(k for k in set(config_a) | set(config_b) if config_a.get(k) != config_b.get(k))
        return False, f"the configs differ beyond the expert counts (in {keys[:3] or 'a nested key'})"
    parts = 0
    for name in names_a:
        if a.parts[name] != b.parts[name]:
            return False, f"{name} is stored in different parts"
        for part in a.parts[name]:
            ta, tb = a.layout.tensors[part], b.layout.tensors[part]
            if (ta.dtype, ta.shape) != (tb.dtype, tb.shape):
                return False, f"{part} has another dtype or shape"
            if _sha256(a.model_dir / ta.shard, ta.start, ta.end) != _sha256(b.model_dir / tb.shard, tb.start, tb.end):
                return False, f"{part} has other bytes (sha256)"
            parts += 1
    return True, f"{parts} tensors outside the decoder layers have the same sha256 in both checkpoints"


def _pass(streamed: StreamedModel, captured: dict, batches: list, cache, key: str, blocks, on_layer) -> dict:
    """Every batch through every decoder layer of `streamed`, the states in `cache` under (key, batch);
    with `blocks`, the router-mode usage counts of each layer's blocks (block key -> float64 [E])."""
    from ..observe.usage import ExpertUsage

    by_layer = streamed.blocks_by_layer(blocks) if blocks else {}
    counts: dict = {}
    for i in streamed._layers(on_layer):
        started = time.perf_counter()
        mine = by_layer.get(i)
        with ExpertUsage(streamed.model, mine) if mine else contextlib.nullcontext() as usage:
            for b, batch in enumerate(batches):
                if usage is not None:
                    usage.batch(batch.modality)
                cache.put((key, b), streamed._through(i, captured[id(batch)], cache.get((key, b))))
        if usage is not None:
            counts.update(usage.totals())
        streamed._clock("compute", started)
    return counts


def compare_pass(
    pruned: StreamedModel, original: StreamedModel | None, batches: list, blocks: list, on_layer=None
) -> tuple[list[tuple], dict, dict]:
    """The streamed comparison of `batches`. Returns (per batch: (pruned-vs-original metrics, the original's
    own metrics or None) as candidates._token_metrics gives them, the pruned model's usage counts per block
    key in `blocks` order, what was run: shared pre-layer parts and why, loader and memory counters)."""
    from ..candidates import _token_metrics

    info: dict = {}
    shared = False
    if original is not None:
        shared, why = same_outer(original, pruned)
        info["pre_layer_parts"] = {"run_once": shared, "why": why}
    cache = None
    try:
        with torch.inference_mode():
            first = original if original is not None else pruned
            captured: dict = {}
            if original is not None:  # the capture puts each batch's first-layer input under its keys
                keyed = [(("original", b), batch) for b, batch in enumerate(batches)]
                if shared:  # the pruned model's outer parts are never read: the original's stand in for them
                    keyed += [(("pruned", b), batch) for b, batch in enumerate(batches)]
                cache, captured["original"] = original._begin(keyed)
                if shared:
                    captured["pruned"] = captured["original"]
            if "pruned" not in captured:  # read once the original's are off the device
                pruned.reader.load(OUTER)
                own, captured["pruned"] = pruned._begin([(("pruned", b), batch) for b, batch in enumerate(batches)])
                if cache is None:
                    cache = own
                else:  # one cache, the original's budgets
                    try:
                        for b in range(len(batches)):
                            cache.put(("pruned", b), own.get(("pruned", b)))
                    finally:
                        own.close()
            if original is not None:
                _pass(original, captured["original"], batches, cache, "original", None, on_layer)
            counts = _pass(pruned, captured["pruned"], batches, cache, "pruned", blocks, on_layer)
            heads = {}
            if original is not None:
                original._outer_to(original.device, head_only=True)
                heads["original"] = original.logits
            if not shared:
                pruned._outer_to(pruned.device, head_only=True)
            heads["pruned"] = heads["original"] if shared else pruned.logits
            started = time.perf_counter()
            out = []
            device = first.device
            for b, batch in enumerate(batches):
                ids = batch.inputs["input_ids"].to(device)
                modality = batch.modality.to(device)
                hidden = cache.get(("pruned", b)).to(device)
                if original is None:
                    m = _token_metrics(hidden, hidden, ids, modality, batch.answer_mask, heads["pruned"])
                    out.append((m, None))
                    continue
                reference = cache.get(("original", b)).to(device)
                m = _token_metrics(
                    reference, hidden, ids, modality, batch.answer_mask, heads["pruned"], ref_head=heads["original"]
                )
                ref = _token_metrics(reference, reference, ids, modality, batch.answer_mask, heads["original"])
                out.append((m, ref))
            first._clock("head", started)
            first._note_cache(cache, [r for records in captured.values() for r in records.values()])
    finally:
        if cache is not None:
            cache.close()
    zeros = {b.key: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
    models = {"pruned": pruned} if original is None else {"original": original, "pruned": pruned}
    info["models"] = {
        name: {
            "decoder_layers": len(m.layers),
            "largest_layer_gib": round(m.layer_bytes() / 2**30, 4),
            "peak_resident_layers": m.reader.peak_resident,
            "tensors_read": sum(m.reader.reads.values()),
            "tensors": len(m.reader.layout.tensors),
            "seconds": {k: round(v, 3) for k, v in m.timings.items()},
        }
        for name, m in models.items()
    }
    info["memory"] = first.memory_report()
    return out, {b.key: counts.get(b.key, zeros[b.key]) for b in blocks}, info
