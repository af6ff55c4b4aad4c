"""Saliency criteria from the accumulated sums, and the keep plan (selection) per MoE block.

Criteria (ARCHITECTURE.md §5), for expert j with routed tokens R_j:
  reap               Σ_{R_j} g·‖f‖ / |R_j|        (the REAP paper's score)
  reap_sum           Σ_{R_j} g·‖f‖
  soft_reap          Σ_all p·‖f‖ / N              (full mode only)
  ean_sum            Σ_{R_j} ‖f‖
  ean_mean           Σ_{R_j} ‖f‖ / |R_j|
  frequency          |R_j|
  weighted_frequency Σ_{R_j} g
  max_activation     max_{R_j} max|f|
A mean over no routed tokens is undefined: such an expert scores -inf and is removed first
(it never did any work on the calibration data).
"""

from __future__ import annotations

import numpy as np

from .errors import PlanError
from .settings import CRITERIA

ROUTER_CRITERIA = ("frequency", "weighted_frequency")


def _arr(stats: dict, name: str) -> np.ndarray:
    values = stats.get(name)
    if values is None:
        raise PlanError(
            f"criterion needs '{name}', which this scoring mode did not record",
            "",
            "Use REAP_SCORING_MODE=full (soft_reap) or routed (all other criteria)",
        )
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def _mean(total: np.ndarray, count: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(count > 0, total / np.where(count > 0, count, 1), -np.inf)


def criterion_scores(stats: dict, criterion: str) -> np.ndarray:
    """Scores of one modality's sums (a dict as in metadata layers[key].stats[modality])."""
    count = _arr(stats, "count")
    if criterion == "frequency":
        return count
    if criterion == "weighted_frequency":
        return _arr(stats, "gate_sum")
    if criterion == "reap":
        return _mean(_arr(stats, "gate_norm_sum"), count)
    if criterion == "reap_sum":
        return _arr(stats, "gate_norm_sum")
    if criterion == "ean_sum":
        return _arr(stats, "norm_sum")
    if criterion == "ean_mean":
        return _mean(_arr(stats, "norm_sum"), count)
    if criterion == "max_activation":
        return _arr(stats, "max_abs")
    if criterion == "soft_reap":
        tokens = stats.get("tokens", 0)
        return _arr(stats, "soft_norm_sum") / tokens if tokens else np.full(len(count), -np.inf)
    raise PlanError(f"unknown criterion {criterion!r}", "", "Use one of " + ", ".join(CRITERIA))


def available_criteria(mode: str) -> tuple[str, ...]:
    if mode == "router":
        return ROUTER_CRITERIA
    return CRITERIA if mode == "full" else tuple(c for c in CRITERIA if c != "soft_reap")


def all_scores(layer_stats: dict, mode: str) -> dict[str, list | None]:
    out = {}
    for c in CRITERIA:
        out[c] = criterion_scores(layer_stats["all"], c).tolist() if c in available_criteria(mode) else None
    return out


def n_keep_for(
    num_experts: int, *, ratio: float | None, num_keep: int, top_k: int, round_to: int = 1, n_group: int = 1
) -> int:
    """Experts to keep per block. Refuses plans below top_k, that break routing groups, or that remove nothing."""
    keep = num_keep if num_keep > 0 else num_experts - int(np.floor(num_experts * (ratio or 0.0) + 1e-9))
    keep = min(keep, num_experts)
    if round_to > 1:
        keep -= keep % round_to
    if n_group > 1:
        keep -= keep % n_group  # the same number in every group (see select)
    if keep >= num_experts:
        asked = f"REAP_NUM_KEEP={num_keep}" if num_keep > 0 else f"a prune ratio of {ratio}"
        raise PlanError(
            f"{asked} keeps all {num_experts} experts: nothing would be pruned",
            "the output would be a copy of the model",
            f"Use REAP_NUM_KEEP below {num_experts}, or a prune ratio of at least {1 / num_experts:.4f} "
            "(one expert per layer)",
        )
    if keep < top_k:
        step = max(round_to, n_group, 1)
        smallest = -(-top_k // step) * step  # smallest kept count that satisfies every constraint
        max_ratio = (num_experts - smallest) / num_experts
        raise PlanError(
            f"the plan keeps {keep} of {num_experts} experts, fewer than the model's top_k={top_k}",
            "every token must still find top_k experts",
            f"Use a prune ratio of at most {max_ratio:.4f} (keep >= {smallest}) or REAP_NUM_KEEP >= {smallest}",
        )
    return keep


def _normalised(scores: np.ndarray) -> np.ndarray:
    """Scores divided by the layer's best (all criteria are >= 0): 1 = the top expert of that modality.
    Experts the modality never routed to get -1."""
    finite = np.isfinite(scores)
    top = scores[finite].max() if finite.any() else 0.0
    return np.where(finite, scores / top if top > 0 else 0.0, -1.0)


SUMMED = ("count", "gate_sum", "norm_sum", "gate_norm_sum", "prob_sum", "soft_norm_sum")
MODALITIES = ("text", "image")


def modality_weights(layer_stats: dict, modality: str = "balanced") -> dict[str, float]:
    """Weight of one token of each modality when the modalities' sums are combined.

    joint: 1 per token (token-weighted: the modality with more tokens decides). balanced: N / (M · N_m) for
    the M modalities that have tokens (N = all their tokens), so that each modality contributes as much as
    if it had N / M tokens: the sums are those of a calibration set in which every modality has the same
    number of tokens. A modality without tokens gets weight 0 (balanced then equals joint)."""
    tokens = {m: int((layer_stats.get(m) or {}).get("tokens") or 0) for m in MODALITIES}
    present = [m for m in MODALITIES if tokens[m] > 0]
    if modality != "balanced" or not present:
        return {m: 1.0 for m in MODALITIES}
    total = sum(tokens[m] for m in present)
    return {m: total / (len(present) * tokens[m]) if tokens[m] else 0.0 for m in MODALITIES}


def weighted_stats(layer_stats: dict, weights: dict[str, float]) -> dict:
    """The per-modality sums combined with per-token weights: every summed field Σ_m w_m · sum_m, tokens
    Σ_m w_m · N_m; max |f| is the peak over the modalities with weight > 0 (a maximum has no weight).
    Mean criteria (reap, ean_mean) become weighted means: Σ w·g‖f‖ / Σ w over routed tokens."""
    parts = [(m, w) for m, w in weights.items() if w > 0 and m in layer_stats]
    if not parts:
        return layer_stats["all"]
    out: dict = {"tokens": sum(w * layer_stats[m].get("tokens", 0) for m, w in parts)}
    for name in SUMMED:
        columns = [layer_stats[m].get(name) for m, _ in parts]
        if any(c is None for c in columns):
            out[name] = None
            continue
        out[name] = sum(
            w * np.array([np.nan if v is None else v for v in c], dtype=np.float64)
            for c, (_, w) in zip(columns, parts, strict=True)
        ).tolist()
    peaks = [layer_stats[m].get("max_abs") for m, _ in parts]
    if all(p is not None for p in peaks):
        out["max_abs"] = np.max(np.array(peaks, dtype=np.float64), axis=0).tolist()
    return out


def modality_scores(layer_stats: dict, criterion: str, modality: str) -> np.ndarray:
    if modality == "joint":
        return criterion_scores(layer_stats["all"], criterion)
    if modality == "balanced":
        if "text" not in layer_stats or "image" not in layer_stats:
            return criterion_scores(layer_stats["all"], criterion)  # no per-modality sums: nothing to balance
        return criterion_scores(weighted_stats(layer_stats, modality_weights(layer_stats)), criterion)
    if modality in ("text", "image"):
        return criterion_scores(layer_stats[modality], criterion)
    if modality == "either":
        return np.maximum(
            _normalised(criterion_scores(layer_stats["text"], criterion)),
            _normalised(criterion_scores(layer_stats["image"], criterion)),
        )
    raise PlanError(f"unknown modality policy {modality!r}", "", "Use balanced, joint, text, image or either")


def super_experts(layer_stats: dict, factor: float) -> dict[int, str]:
    """Experts whose peak |activation| exceeds `factor` x the layer's median peak (over experts that
    were routed at all). Such 'super experts' carry outlier activations that a few tokens depend on;
    their mean score can be small, so they are protected from removal."""
    peaks = np.array(layer_stats["all"]["max_abs"], dtype=np.float64)
    routed = np.array(layer_stats["all"]["count"], dtype=np.float64) > 0
    if not routed.any() or not peaks[routed].any():
        return {}
    median = float(np.median(peaks[routed]))
    return {
        int(j): f"super expert: max |f| {peaks[j]:.3g} > {factor:g} x layer median {median:.3g}"
        for j in np.nonzero(routed & (peaks > factor * median))[0]
    }


def _ranked(scores: np.ndarray, candidates: np.ndarray) -> list[int]:
    # highest score first; ties broken by lower index so plans are deterministic
    return sorted(candidates.tolist(), key=lambda j: (-scores[j] if np.isfinite(scores[j]) else np.inf, j))


def select(
    layer_stats: dict,
    *,
    criterion: str,
    n_keep: int,
    n_group: int = 1,
    modality: str = "joint",
    protect_super: bool = True,
    super_factor: float = 10.0,
) -> tuple[list[int], dict[int, str]]:
    """(kept original indices ascending, protected {index: reason}) for one block."""
    scores = modality_scores(layer_stats, criterion, modality)
    num_experts = len(scores)
    protected = super_experts(layer_stats, super_factor) if protect_super else {}
    groups = np.array_split(np.arange(num_experts), n_group) if n_group > 1 else [np.arange(num_experts)]
    per_group = n_keep // len(groups)
    kept: list[int] = []
    for members in groups:
        forced = [j for j in _ranked(scores, members) if j in protected]
        if len(forced) > per_group:
            raise PlanError(
                f"{len(forced)} super experts are protected in one routing group, more than the "
                f"{per_group} experts kept there",
                "",
                "Keep more experts, raise REAP_SUPER_EXPERT_FACTOR, or set REAP_PROTECT_SUPER_EXPERTS=false",
            )
        rest = [j for j in _ranked(scores, members) if j not in protected]
        kept.extend(forced + rest[: per_group - len(forced)])
    return sorted(kept), {j: r for j, r in protected.items() if j in kept}


def plan(
    meta_layers: dict[str, dict],
    blocks: list[dict],
    *,
    criterion: str,
    ratio: float | None,
    num_keep: int,
    modality: str = "joint",
    round_to: int = 1,
    protect_super: bool = True,
    super_factor: float = 10.0,
) -> dict[str, dict]:
    """Keep plan for every block: {key: {"kept": [...], "protected": {...}}}."""
    out = {}
    for block in blocks:
        n_keep = n_keep_for(
            block["num_experts"],
            ratio=ratio,
            num_keep=num_keep,
            top_k=block["top_k"],
            round_to=round_to,
            n_group=block.get("n_group", 1),
        )
        kept, protected = select(
            meta_layers[block["key"]]["stats"],
            criterion=criterion,
            n_keep=n_keep,
            n_group=block.get("n_group", 1),
            modality=modality,
            protect_super=protect_super,
            super_factor=super_factor,
        )
        out[block["key"]] = {"kept": kept, "protected": {str(j): r for j, r in protected.items()}}
    return out
