"""Choose the plan by measurement: every criterion × ratio, evaluated on held-out data by router masking.

For each held-out batch the unpruned model runs once (the reference), then every distinct
candidate plan runs with its removed experts masked (reap_vlm.masking — exactly equivalent to the
pruned checkpoint). Per plan: next-token loss and perplexity (text targets only) per source and per
sample kind, top-1 agreement and KL(unpruned ‖ masked), and the normalised entropy of expert usage.

The held-out slice never overlaps the scored samples: built-in sets read their evaluation files;
JSONL files and image folders are split by a content hash (reap_vlm.calibration), so a sample is
in exactly one split.
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch

from . import scoring
from .calibration import load_samples
from .errors import PlanError
from .loading import input_device
from .masking import masked, removed_from_kept
from .moe.spec import MoEBlock
from .observe.usage import ExpertUsage, usage_entropy

BOOTSTRAP_RESAMPLES = 1000


def heldout_samples(settings):
    return load_samples(
        settings.calibration,
        "evaluation",
        max_samples=settings.eval_samples,
        seed=settings.seed,
        image_share=settings.image_share,
        shuffle=settings.shuffle,
    )


def _token_metrics(
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    modality: torch.Tensor,
    answer_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-row sums over next-token positions, for two sets of targets (float64 tensors of shape [B]).

    The prediction at position t is scored against the token at t + 1 (its target). `ref_logits` are the
    reference (unpruned) model's, `logits` the model under test; pass the same tensor twice for the
    reference's own loss. Keys, each a per-row sum over the targets of its set:

    - text targets (every real text token, prompt and answer alike, as before):
      "nll" (−log p of the target), "kl" (KL(reference ‖ model) of the next-token distributions),
      "agree" (1 where both models' top-1 is the same token), "overlap" (Σ_v min(p_ref, p), 1 = the same
      distribution), "tokens" (the number of targets);
    - answer targets (the reference answer's tokens and its end-of-turn token, Batch.answer_mask; zeros
      without one): "answer_nll", "answer_kl", "answer_agree", "answer_overlap", "answer_tokens", and
      "answer_correct": 1 where the row has an answer and the model's top-1 is the target at every answer
      position — which is exactly when greedy decoding reproduces the reference answer token for token.

    Per-token means are sum / tokens over any group of rows."""
    logp = torch.log_softmax(logits[:, :-1].float(), -1)
    ref_logp = torch.log_softmax(ref_logits[:, :-1].float(), -1)
    targets = input_ids[:, 1:]
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    ref_p = ref_logp.exp()
    kl = (ref_p * (ref_logp - logp)).sum(-1).clamp_min(0).double()
    overlap = torch.minimum(ref_p, logp.exp()).sum(-1).double()
    top1 = logp.argmax(-1)
    agree = (top1 == ref_logp.argmax(-1)).double()
    out = {}
    text = ((modality[:, 1:] == 0) & (modality[:, :-1] >= 0)).double()
    if answer_mask is None:
        answer = torch.zeros_like(text)
    else:
        answer = answer_mask[:, 1:].to(text.device).double()
    for prefix, w in (("", text), ("answer_", answer)):
        out[prefix + "nll"] = (nll * w).sum(1)
        out[prefix + "kl"] = (kl * w).sum(1)
        out[prefix + "agree"] = (agree * w).sum(1)
        out[prefix + "overlap"] = (overlap * w).sum(1)
        out[prefix + "tokens"] = w.sum(1)
    wrong = ((top1 != targets).double() * answer).sum(1)
    out["answer_correct"] = ((out["answer_tokens"] > 0) & (wrong == 0)).double()
    return out


def _summarise(rows: list[dict]) -> dict:
    tokens = sum(r["tokens"] for r in rows)
    if tokens == 0:
        return {"tokens": 0, "loss": None, "ppl": None, "agreement": None, "kl": None}
    loss = sum(r["nll"] for r in rows) / tokens
    return {
        "tokens": int(tokens),
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "agreement": sum(r["agree"] for r in rows) / tokens,
        "kl": sum(r["kl"] for r in rows) / tokens,
    }


def _describe(per_row: list[dict]) -> dict:
    out = _summarise(per_row)
    for field, values in (("by_source", {r["source"] for r in per_row}), ("by_modality", {r["kind"] for r in per_row})):
        key = "source" if field == "by_source" else "kind"
        out[field] = {v: _summarise([r for r in per_row if r[key] == v]) for v in sorted(values)}
    return out


def measure_plans(
    model,
    blocks: list[MoEBlock],
    meta: dict,
    eval_batches: list,
    *,
    criteria,
    ratios,
    num_keep: int = 0,
    modality: str = "joint",
    round_to: int = 1,
    protect_super: bool = True,
    super_factor: float = 10.0,
    progress=None,
) -> dict:
    started = time.perf_counter()
    blocks_meta = meta["model"]["blocks"]
    candidates: list[dict] = []
    notes: list[str] = []
    by_signature: dict[tuple, int] = {}
    plans: list[dict] = []
    for ratio in ratios:
        for criterion in criteria:
            try:
                plan = scoring.plan(
                    meta["layers"],
                    blocks_meta,
                    criterion=criterion,
                    ratio=ratio,
                    num_keep=num_keep if ratio is None else 0,
                    modality=modality,
                    round_to=round_to,
                    protect_super=protect_super,
                    super_factor=super_factor,
                )
            except PlanError as err:
                notes.append(f"{criterion} at ratio {ratio}: skipped ({err.what})")
                continue
            kept = {k: v["kept"] for k, v in plan.items()}
            signature = tuple(tuple(kept[b.key]) for b in blocks)
            if signature not in by_signature:
                by_signature[signature] = len(plans)
                plans.append(kept)
            candidates.append(
                {
                    "criterion": criterion,
                    "ratio": ratio,
                    "plan": by_signature[signature],
                    "n_keep": {k: len(v) for k, v in kept.items()},
                }
            )

    per_plan_rows: list[list[dict]] = [[] for _ in plans]
    baseline_rows: list[dict] = []
    plan_counts = {
        pi: {b.key: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks} for pi in range(-1, len(plans))
    }
    device = input_device(model)
    with ExpertUsage(model, blocks) as usage, torch.inference_mode():
        # batches outer, plans inner: the reference logits of one batch are all that is kept
        for bi, batch in enumerate(eval_batches):
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            reference = None
            for pi in range(-1, len(plans)):
                usage.batch(batch.modality)
                before = usage.totals()
                if pi == -1:
                    logits = reference = model(**inputs, use_cache=False).logits
                else:
                    with masked(model, blocks, removed_from_kept(blocks, plans[pi])):
                        logits = model(**inputs, use_cache=False).logits
                for key, total in usage.totals().items():
                    plan_counts[pi][key] += total - before[key]
                m = _token_metrics(
                    reference, logits, inputs["input_ids"], batch.modality.to(logits.device), batch.answer_mask
                )
                rows = baseline_rows if pi == -1 else per_plan_rows[pi]
                for r, sample in enumerate(batch.samples):
                    rows.append(
                        {
                            "source": sample.source,
                            "kind": sample.kind,
                            "task": sample.task,
                            "sample": sample.id,
                            **{k: float(v[r]) for k, v in m.items()},
                        }
                    )
            if progress:
                progress(bi + 1, len(eval_batches))

    def entropy(counts: dict[str, torch.Tensor], kept: dict[str, list[int]] | None) -> float:
        """Mean over blocks of the usage entropy normalised by log(number of kept experts)."""
        values = [usage_entropy(c, len(kept[key]) if kept else len(c)) for key, c in counts.items()]
        return float(np.mean([1.0 if v is None else v for v in values]))

    usage_counts = [entropy(plan_counts[pi], None if pi == -1 else plans[pi]) for pi in range(-1, len(plans))]

    baseline = {**_describe(baseline_rows), "entropy": usage_counts[0]}
    rows = []
    for c in candidates:
        described = _describe(per_plan_rows[c["plan"]])
        rows.append(
            {
                "criterion": c["criterion"],
                "ratio": c["ratio"],
                "n_keep": c["n_keep"],
                "plan_id": c["plan"],
                **described,
                "entropy": usage_counts[c["plan"] + 1],
            }
        )
    heldout_tokens = {"samples": len(baseline_rows), "text_targets": int(sum(r["tokens"] for r in baseline_rows))}
    return {
        "baseline": baseline,
        "rows": rows,
        "notes": notes,
        "heldout": heldout_tokens,
        "plans_evaluated": len(plans),
        "seconds": round(time.perf_counter() - started, 3),
        "_per_sample": {
            i: [r["nll"] / r["tokens"] if r["tokens"] else 0.0 for r in rows_] for i, rows_ in enumerate(per_plan_rows)
        },
    }


def _bootstrap_better(a: list[float], b: list[float], seed: int) -> tuple[bool, float, float]:
    """Is mean(a) > mean(b) beyond noise? Paired bootstrap 95 % interval of mean(a - b)."""
    diff = np.array(a) - np.array(b)
    if len(diff) < 2:
        return False, float(diff.mean()) if len(diff) else 0.0, 0.0
    rng = random.Random(seed)
    means = sorted(float(np.mean([diff[rng.randrange(len(diff))] for _ in diff])) for _ in range(BOOTSTRAP_RESAMPLES))
    lo, hi = means[int(0.025 * BOOTSTRAP_RESAMPLES)], means[int(0.975 * BOOTSTRAP_RESAMPLES) - 1]
    return lo > 0, lo, hi


def measure_and_choose(model, blocks: list[MoEBlock], meta: dict, eval_batches: list, settings):
    """(criterion, reason, table): auto picks the lowest held-out loss at the requested ratio (ties → reap);
    a fixed criterion is kept, and the reason says when another one is measurably better."""
    mode = settings.scoring_mode
    criteria = scoring.available_criteria(mode)
    requested = None if settings.num_keep else settings.prune_ratio
    ratios = [requested] + [r for r in settings.candidate_ratios if r != requested]
    table = measure_plans(
        model,
        blocks,
        meta,
        eval_batches,
        criteria=criteria,
        ratios=ratios,
        num_keep=settings.num_keep,
        modality=settings.modality,
        round_to=settings.round_to,
        protect_super=settings.protect_super_experts,
        super_factor=settings.super_expert_factor,
    )
    per_sample = table.pop("_per_sample")
    at_ratio = [r for r in table["rows"] if r["ratio"] == requested and r["loss"] is not None]
    if not at_ratio:
        fallback = "weighted_frequency" if mode == "router" else "reap"
        criterion = fallback if settings.criterion == "auto" else settings.criterion
        return (
            criterion,
            "held-out slice has no text targets; "
            + ("default" if settings.criterion == "auto" else "fixed")
            + " criterion",
            table,
        )
    best = min(at_ratio, key=lambda r: (round(r["loss"], 9), r["criterion"] != "reap"))
    table["chosen"] = {"criterion": best["criterion"], "ratio": requested, "loss": best["loss"]}
    if settings.criterion == "auto":
        reason = (
            f"auto: lowest held-out loss {best['loss']:.5f} at ratio {requested} among "
            f"{len(at_ratio)} criteria ({table['heldout']['samples']} held-out samples)"
        )
        return best["criterion"], reason, table
    mine = next((r for r in at_ratio if r["criterion"] == settings.criterion), None)
    if mine is None:
        return settings.criterion, "fixed by REAP_CRITERION (not measurable in this mode)", table
    better, lo, hi = _bootstrap_better(per_sample[mine["plan_id"]], per_sample[best["plan_id"]], settings.seed)
    reason = "fixed by REAP_CRITERION"
    if better:
        reason += (
            f"; note: {best['criterion']} is measurably better on held-out data (loss {best['loss']:.5f} vs "
            f"{mine['loss']:.5f}, 95% bootstrap interval of the difference [{lo:.4f}, {hi:.4f}])"
        )
        print(
            f"note: criterion {best['criterion']} keeps the model measurably better than {settings.criterion} "
            f"(held-out loss {best['loss']:.5f} vs {mine['loss']:.5f})"
        )
    table["chosen"] = {
        "criterion": settings.criterion,
        "ratio": requested,
        "loss": mine["loss"],
        "best_measured": best["criterion"],
        "measurably_better": better,
    }
    return settings.criterion, reason, table
