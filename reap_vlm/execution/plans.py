"""The candidate plans of streamed scoring, cut layer by layer inside the statistics' pass.

candidates.measure_and_choose measures, besides the greedy search and the merge candidates: every
criterion of the scoring mode under REAP_MODALITY at every ratio, with REAP_CRITERION=auto the other
modality policies at the requested ratio, and the random plans at the requested ratio. A block's kept
experts depend on that block's statistics only (scoring.select), so each candidate's plan of a layer
can be cut as soon as the layer's calibration batches are through, and its held-out hidden states run
through the same resident layer (execution.stream.score_pass). measure_plans then asks
StreamedModel.run_plans for its plans and gets them from that pass; a plan missing here (the greedy
search's: its steps depend on each other) costs another pass over the weights (StreamedModel.extra_passes).
"""

from __future__ import annotations

from dataclasses import dataclass

from .. import scoring
from ..errors import PlanError


@dataclass(frozen=True)
class Candidate:
    criterion: str
    policy: str
    ratio: float | None
    seed: int | None = None  # random plans


def candidates_for(settings) -> list[Candidate]:
    """What measure_and_choose measures for these settings (the greedy search and merging aside)."""
    from ..candidates import POLICIES, RANDOM_SEEDS

    criteria = scoring.available_criteria(settings.scoring_mode)
    requested = None if settings.num_keep else settings.prune_ratio
    ratios = [requested] + [r for r in settings.candidate_ratios if r != requested]
    policies = POLICIES if settings.criterion == "auto" else ()
    out = []
    for i, ratio in enumerate(ratios):
        measured = [settings.modality] + ([p for p in policies if p != settings.modality] if i == 0 else [])
        out += [Candidate(c, policy, ratio) for policy in measured for c in criteria]
    out += [Candidate("random", "random", ratios[0], seed) for seed in RANDOM_SEEDS]
    return out


def block_meta(blocks) -> list[dict]:
    """The metadata's description of the blocks (what the plan functions read)."""
    return [{"key": b.key, "num_experts": b.num_experts, "top_k": b.top_k, "n_group": b.n_group} for b in blocks]


class LayerCuts:
    """`cut(stats)` for stream.PlanSpace: every candidate's kept experts of one layer's blocks."""

    def __init__(self, settings, blocks):
        from ..candidates import random_plan

        self.settings = settings
        self.candidates = candidates_for(settings)
        self.meta = {b["key"]: b for b in block_meta(blocks)}
        self.random: dict[int, dict | None] = {}
        failed = False
        for c, candidate in enumerate(self.candidates):
            if candidate.policy != "random":
                continue
            plan = None
            if not failed:  # measure_plans stops at the first random plan that cannot be cut
                try:
                    plan = random_plan(
                        list(self.meta.values()),
                        ratio=candidate.ratio,
                        num_keep=settings.num_keep,
                        round_to=settings.round_to,
                        seed=candidate.seed,
                    )
                except PlanError:
                    failed = True
            self.random[c] = plan

    @property
    def count(self) -> int:
        return len(self.candidates)

    def __call__(self, stats: dict) -> list[dict[str, list[int]] | None]:
        s = self.settings
        layer = [self.meta[key] for key in stats]
        out: list[dict[str, list[int]] | None] = []
        for c, candidate in enumerate(self.candidates):
            if candidate.policy == "random":
                plan = self.random[c]
                out.append(None if plan is None else {key: plan[key] for key in stats})
                continue
            try:
                cut = scoring.plan(
                    {key: {"stats": value} for key, value in stats.items()},
                    layer,
                    criterion=candidate.criterion,
                    ratio=candidate.ratio,
                    num_keep=s.num_keep if candidate.ratio is None else 0,
                    modality=candidate.policy,
                    round_to=s.round_to,
                    protect_super=s.protect_super_experts,
                    super_factor=s.super_expert_factor,
                )
            except PlanError:
                out.append(None)
                continue
            out.append({key: value["kept"] for key, value in cut.items()})
        return out


class MergeCut:
    """The merge candidate of measure_plans (candidates._merge_candidate: REAP_EVAL_MERGE, the requested ratio,
    the default criterion's saliency under REAP_MODALITY), cut layer by layer for stream.MergeSpace. A block's
    merge groups depend on that block's statistics and merge statistics only (merge_checkpoint.build_groups), so
    they are made as soon as the layer's calibration batches are through, and the merged experts from the
    resident layer's weights. `key` is what candidates._merge_candidate asks StreamedModel.run_plans for."""

    def __init__(self, settings, blocks):
        from ..candidates import DEFAULT_CRITERION, _n_keep

        ratio = None if settings.num_keep else settings.prune_ratio
        self.criterion, self.policy = DEFAULT_CRITERION.get(settings.scoring_mode, "reap"), settings.modality
        self.grouping, self.group_size, self.router = (
            settings.merge_grouping,
            settings.merge_group_size,
            settings.merge_router,
        )
        self.key = merge_key(f"{self.criterion}/{self.policy}", ratio, self.grouping, self.group_size, self.router)
        self.meta = {
            b.key: {**m, "layer": b.layer, "expert_set": b.expert_set}
            for b, m in zip(blocks, block_meta(blocks), strict=True)
        }
        try:
            counts = {_n_keep(m, ratio, settings.num_keep, settings.round_to) for m in self.meta.values()}
        except PlanError:
            counts = set()
        self.k = counts.pop() if len(counts) == 1 else None  # else _merge_candidate notes why it is skipped

    def __call__(self, stats: dict, tensors: dict):
        """(groups, saliency, activations, kept centroids) of one layer's blocks (`stats`: block key -> what
        Observer.export() gives; `tensors`: block key -> its merge statistics), or None where it cannot merge."""
        from ..methods.merge_checkpoint import build_groups

        if self.k is None:
            return None
        meta = {
            "model": {"blocks": [self.meta[key] for key in stats]},
            "layers": {key: {"stats": value} for key, value in stats.items()},
        }
        try:
            groups, saliency, acts = build_groups(
                meta,
                tensors,
                self.k,
                self.criterion,
                grouping=self.grouping,
                group_size=self.group_size,
                modality=self.policy,
            )
        except PlanError:
            return None
        kept = {f"{layer}.{s}": sorted(g[0] for g in gs) for (layer, s), gs in groups.items()}
        return groups, saliency, acts, kept


def merge_key(base: str, ratio, grouping: str, group_size: int, router: str) -> tuple:
    """What identifies a merge candidate between the statistics' pass and measure_plans."""
    return ("merge", base, ratio, grouping, group_size, router)
