"""Merging on disk: group, align and average the experts of a checkpoint without loading the model.

The plan is the pruning plan that keeps the groups' centroids (`plan_prune`: the same validation, the
same byte ranges for every untouched tensor, the same router slicing and renumbering); the expert
tensors of every centroid whose group has more than one member are then replaced by `Computed` pieces
that read the group's expert tensors from the shards (tensor by tensor, a layer at a time), merge them
(methods.merge) and return the bytes in the source's own layout and dtype. The writer, its atomic
rename and its verification are shared with pruning.

Layouts: per-expert `experts.{j}.{gate_proj,up_proj,down_proj}.{weight,bias}` (Mixtral: w1 gate, w3 up,
w2 down) and fused `experts.gate_up_proj` / `experts.down_proj` (+ `_bias`; `up_proj` without a gate),
in the memory orientation [E, 2I, H] / [E, H, I] or the transposed one [E, H, 2I] / [E, I, H].
Quantized experts, interleaved gate/up columns (gpt-oss), split expert sets (Ernie-4.5-VL) and
appended zero experts are refused with one line.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from ..checkpoint.layout import Layout
from ..checkpoint.write import Computed, OutTensor, PrunePlan, _slice_rows, plan_prune
from ..errors import BugError, CheckpointError, PlanError, UnsupportedModelError
from . import merge

FLOAT_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
PER_EXPERT_PROJ = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down", "w1": "gate", "w3": "up", "w2": "down"}
FUSED = {
    "gate_up_proj": "gate_up",
    "down_proj": "down",
    "up_proj": "up",
    "gate_up_proj_bias": "gate_up_bias",
    "down_proj_bias": "down_bias",
    "up_proj_bias": "up_bias",
}
INTERLEAVED_TYPES = ("gpt_oss",)  # gate/up columns interleaved on disk: not this reader's layout
HOW = "Use --method prune for this checkpoint (merging reads plain float experts)"


def _refuse(what: str, why: str = "") -> None:
    raise UnsupportedModelError(f"cannot merge experts: {what}", why, HOW)


@dataclass
class BlockSource:
    """Where one block's expert tensors are on disk and how they are oriented."""

    prefix: str
    key: tuple[int, str]
    per_expert: dict[tuple[str, str], str] = field(default_factory=dict)  # (part, suffix) -> pattern with {j}
    fused: dict[str, str] = field(default_factory=dict)  # part -> tensor name
    transposed: bool = False
    dtype: str = ""


def _hidden_size(config: dict) -> int:
    for cfg in (config.get("text_config") or {}, config):
        if isinstance(cfg.get("hidden_size"), int):
            return cfg["hidden_size"]
    return 0


def block_sources(layout: Layout) -> dict[tuple[int, str], BlockSource]:
    """Every block's BlockSource; refuses what this reader cannot merge exactly."""
    if layout.config.get("model_type") in INTERLEAVED_TYPES:
        _refuse(f"{layout.config['model_type']} stores gate and up columns interleaved")
    hidden = _hidden_size(layout.config)
    out = {}
    for prefix, block in layout.blocks.items():
        if block.sets:
            _refuse(f"block {prefix} holds several expert sets in one list")
        src = BlockSource(prefix, block.key)
        dtypes = set()
        for name, role in layout.roles.items():
            if role.block != prefix or role.kind not in ("expert", "fused"):
                continue
            info = layout.tensors[name]
            dtypes.add(info.dtype)
            if info.dtype not in FLOAT_DTYPES:
                _refuse(f"{name} is {info.dtype}", "quantized experts cannot be averaged without dequantizing")
            if role.kind == "expert":
                if role.expert >= block.num_experts:
                    _refuse(f"{name} is one of the block's appended non-routed experts")
                rest = role.pattern.split("{j}.", 1)[1]
                proj, _, suffix = rest.partition(".")
                if proj not in PER_EXPERT_PROJ or suffix not in ("weight", "bias"):
                    _refuse(f"{name} is not a gate / up / down projection weight or bias")
                src.per_expert[(PER_EXPERT_PROJ[proj], suffix)] = role.pattern
            else:
                leaf = name[len(prefix) + len(".experts.") :]
                if leaf not in FUSED or info.shape[0] != block.num_experts:
                    _refuse(f"{name} is not a fused gate_up / up / down tensor of {block.num_experts} experts")
                src.fused[FUSED[leaf]] = name
        if src.per_expert and src.fused:
            _refuse(f"block {prefix} mixes fused and per-expert tensors")
        if len(dtypes) > 1:
            _refuse(f"block {prefix} stores its experts in several dtypes {sorted(dtypes)}")
        src.dtype = dtypes.pop() if dtypes else ""
        if src.fused:
            down = layout.tensors[src.fused["down"]].shape
            if down[1] == hidden != down[2]:
                src.transposed = False
            elif down[2] == hidden != down[1]:
                src.transposed = True
            else:
                _refuse(f"the orientation of {src.fused['down']} {list(down)} is ambiguous (hidden size {hidden})")
        parts = {p for p, _ in src.per_expert} | {p.removesuffix("_bias") for p in src.fused}
        if not {"up", "down"} <= (parts | ({"up"} if "gate_up" in parts else set())):
            _refuse(f"block {prefix} has no up / down projection")
        out[block.key] = src
    return out


class ExpertReader:
    """Reads experts' canonical weights (gate/up [I, H], down [H, I], biases) from the shards."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self._files: OrderedDict[str, object] = OrderedDict()

    def _tensor(self, name: str, row: int | None = None) -> torch.Tensor:
        from safetensors import safe_open

        shard = self.layout.tensors[name].shard
        if shard not in self._files:
            if len(self._files) >= 4:
                self._files.popitem(last=False)
            self._files[shard] = safe_open(str(self.layout.src / shard), "pt")
        f = self._files[shard]
        return f.get_tensor(name) if row is None else f.get_slice(name)[row]

    def experts(self, src: BlockSource, idx: list[int]) -> merge.LayerExperts:
        """Experts idx (in that order) as one LayerExperts, float32."""
        per = {"gate": [], "up": [], "down": [], "gate_bias": [], "up_bias": [], "down_bias": []}
        for j in idx:
            for part, t in self._one(src, j).items():
                per[part].append(t.float())
        stacked = {k: torch.stack(v) if v else None for k, v in per.items()}
        return merge.LayerExperts(**stacked)

    def _one(self, src: BlockSource, j: int) -> dict[str, torch.Tensor]:
        out = {}
        if src.per_expert:
            for (part, suffix), pattern in src.per_expert.items():
                out[part if suffix == "weight" else f"{part}_bias"] = self._tensor(pattern.format(j=j))
            return out
        for part, name in src.fused.items():
            t = self._tensor(name, j)
            if part.endswith("_bias"):
                if part == "gate_up_bias":
                    half = t.shape[0] // 2
                    out["gate_bias"], out["up_bias"] = t[:half], t[half:]
                else:
                    out[part] = t
                continue
            t = t.T if src.transposed else t  # -> nn.Linear convention
            if part == "gate_up":
                half = t.shape[0] // 2
                out["gate"], out["up"] = t[:half], t[half:]
            else:
                out[part] = t
        return out


def _to_bytes(t: torch.Tensor, dtype: str) -> bytes:
    return t.to(FLOAT_DTYPES[dtype]).contiguous().view(torch.uint8).numpy().tobytes()


def _disk_parts(src: BlockSource, m: merge.MergedExpert) -> dict[str, torch.Tensor]:
    """The merged expert as the tensors of the source layout: per-expert (part, suffix) or fused part."""
    canon = {
        "gate": m.gate,
        "up": m.up,
        "down": m.down,
        "gate_bias": m.gate_bias,
        "up_bias": m.up_bias,
        "down_bias": m.down_bias,
    }
    if src.per_expert:
        return {f"{p}.{suffix}": canon[p if suffix == "weight" else f"{p}_bias"] for p, suffix in src.per_expert}
    out = {}
    for part in src.fused:
        if part == "gate_up":
            t = torch.cat([m.gate, m.up])
        elif part == "gate_up_bias":
            t = torch.cat([m.gate_bias, m.up_bias])
        else:
            t = canon[part]
        out[part] = t.T if src.transposed and not part.endswith("_bias") else t
    return out


class LayerMerge:
    """One block's groups and their merged experts, computed on first use (a few layers are cached)."""

    def __init__(self, src, groups, saliency, acts, reader, router_mode, router_name, pca_dim):
        self.src, self.groups, self.saliency, self.acts = src, groups, saliency, acts
        self.reader, self.router_mode, self.router_name, self.pca_dim = reader, router_mode, router_name, pca_dim
        self._merged: dict[int, dict[str, torch.Tensor]] | None = None

    def merged(self, cache: OrderedDict) -> dict[int, dict[str, torch.Tensor]]:
        """centroid -> {disk part: tensor (float64)} for every group of more than one expert."""
        key = self.src.key
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        multi = [g for g in self.groups if len(g) > 1]
        members = sorted({j for g in multi for j in g})
        local = {j: i for i, j in enumerate(members)}
        experts = self.reader.experts(self.src, members)
        acts = None if self.acts is None else self.acts[members]
        out = merge.merge_layer(
            experts,
            [[local[j] for j in g] for g in multi],
            np.asarray(self.saliency)[members],
            acts,
            pca_dim=self.pca_dim,
        )
        result = {g[0]: _disk_parts(self.src, m) for g, m in zip(multi, out, strict=True)}
        cache[key] = result
        while len(cache) > 2:
            cache.popitem(last=False)
        return result


def plan_merge(
    layout: Layout,
    groups: dict[tuple[int, str], list[list[int]]],
    saliency: dict[tuple[int, str], np.ndarray],
    acts: dict[tuple[int, str], torch.Tensor | None],
    *,
    router_mode: str = "centroid",
    pca_dim: int = merge.PCA_DIM,
    collapse_groups: bool = False,
    max_shard_size: str = "",
) -> PrunePlan:
    """The merged checkpoint's plan: pruning to the centroids, with merged bytes for the merged experts."""
    sources = block_sources(layout)
    keep = {key: sorted(g[0] for g in gs) for key, gs in groups.items()}
    plan = plan_prune(layout, keep, collapse_groups=collapse_groups, max_shard_size=max_shard_size)
    reader = ExpertReader(layout)
    cache: OrderedDict = OrderedDict()
    jobs = {}
    for key, gs in groups.items():
        src = sources.get(key)
        if src is None:
            raise PlanError(f"no MoE block {key} in the checkpoint", "", "Use the metadata written for this model")
        block = layout.block_by_key(key)
        router = next(
            (n for n, r in layout.roles.items() if r.block == block.prefix and r.kind == "router" and r.axis == 0),
            None,
        )
        jobs[key] = LayerMerge(src, gs, saliency[key], acts.get(key), reader, router_mode, router, pca_dim)
    by_name: dict[str, OutTensor] = {t.name: t for ts in plan.shards.values() for t in ts}
    for key, job in jobs.items():
        kept = keep[key]
        new_index = {c: i for i, c in enumerate(kept)}
        merged_centroids = {g[0] for g in job.groups if len(g) > 1}
        src = job.src
        if src.per_expert:
            for (part, suffix), pattern in src.per_expert.items():
                for c in merged_centroids:
                    t = by_name[pattern.format(j=new_index[c])]
                    t.pieces = [_computed(job, cache, c, f"{part}.{suffix}", t.nbytes)]
        else:
            for part, name in src.fused.items():
                info = layout.tensors[name]
                row = info.nbytes // info.shape[0]
                pieces: list = []
                for c in kept:
                    if c in merged_centroids:
                        pieces.append(_computed(job, cache, c, part, row))
                    else:
                        pieces.extend(_slice_rows(info, [c], info.shape[0]))
                by_name[name].pieces = _join_ranges(pieces)
        if router_mode == "average" and job.router_name is not None:
            t = by_name[job.router_name]
            info = layout.tensors[job.router_name]
            if tuple(t.shape) != (len(kept), *info.shape[1:]):
                raise PlanError(
                    f"router {job.router_name} has rows beyond the experts", "", "Use REAP_MERGE_ROUTER=centroid"
                )
            t.pieces = [Computed(t.nbytes, _router_bytes(job, info))]
    return plan


def _computed(job: LayerMerge, cache, centroid: int, part: str, nbytes: int) -> Computed:
    def produce() -> bytes:
        return _to_bytes(job.merged(cache)[centroid][part], job.src.dtype)

    return Computed(nbytes, produce)


def _router_bytes(job: LayerMerge, info):
    def produce() -> bytes:
        weight = job.reader._tensor(info.name).double()
        rows = merge.merged_router(weight, merge.by_centroid(job.groups), job.saliency, "average")
        return _to_bytes(rows, info.dtype) if info.dtype in FLOAT_DTYPES else _bug(info.name)

    return produce


def _bug(name: str) -> bytes:
    raise CheckpointError(f"router {name} is not a float tensor", "its rows cannot be averaged", "Use centroid rows")


def _join_ranges(pieces: list) -> list:
    out: list = []
    for p in pieces:
        if out and isinstance(p, tuple) and isinstance(out[-1], tuple) and out[-1][0] == p[0] and out[-1][2] == p[1]:
            out[-1] = (p[0], out[-1][1], p[2])
        else:
            out.append(p)
    return out


def check_groups(groups: dict[tuple[int, str], list[list[int]]], counts: dict[tuple[int, str], int], k: int) -> None:
    """The invariant REAM's peer got wrong: every block has exactly k groups covering all its experts."""
    for key, gs in groups.items():
        flat = sorted(j for g in gs for j in g)
        if len(gs) != k or flat != list(range(counts[key])):
            raise BugError(f"block {key}: {len(gs)} merge groups over {len(flat)} experts, expected {k}")


def build_groups(
    meta: dict,
    stats: dict[str, dict[str, torch.Tensor]],
    k: int,
    criterion: str,
    *,
    grouping: str = "ream",
    group_size: int = merge.REAM_GROUP_SIZE,
    modality: str = "joint",
) -> tuple[dict, dict, dict]:
    """(groups, saliency, activations) per block key (layer, expert_set) from the metadata's raw sums
    (the criterion under the plan's modality policy, as pruning ranks) and the merge statistics.
    Groups come in centroid order."""
    from ..scoring import modality_scores

    if grouping not in merge.GROUPINGS:
        raise PlanError(f"unknown merge grouping {grouping!r}", "", "Use one of " + ", ".join(merge.GROUPINGS))
    groups, saliency, acts = {}, {}, {}
    for block in meta["model"]["blocks"]:
        name, E = block["key"], block["num_experts"]
        key = (block["layer"], block["expert_set"])
        s = stats.get(name)
        if s is None or "mean_gated_output" not in s:
            raise PlanError(
                f"the merge statistics have no entry for block {name}",
                "they were written for another model or run",
                "Re-run reap in full mode",
            )
        sal = merge.floor_saliency(modality_scores(meta["layers"][name]["stats"], criterion, modality))
        mean_out = s["mean_gated_output"].double()
        if grouping == "ream":
            dist = merge.expert_distance(mean_out, s.get("router_logit_gram"))
            gs = merge.ream_groups(sal, dist, k, group_size)
        else:
            gs = merge.hc_groups(mean_out, k, sal)
        groups[key] = merge.by_centroid(gs)
        saliency[key] = sal
        a = s.get("activations")
        acts[key] = a if a is not None and a.shape[1] > 1 else None
        if len(sal) != E:
            raise BugError(f"block {name}: {len(sal)} scores for {E} experts")
    check_groups(groups, {(b["layer"], b["expert_set"]): b["num_experts"] for b in meta["model"]["blocks"]}, k)
    return groups, saliency, acts
