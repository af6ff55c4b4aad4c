"""Choose the plan by measurement: every criterion × modality policy × ratio, a greedy search and random
plans, evaluated on held-out data by router masking.

For each held-out batch the unpruned model runs once (the reference), then every distinct
candidate plan runs with its removed experts masked (reap_vlm.masking — exactly equivalent to the
pruned checkpoint). Per plan: next-token loss and perplexity (text targets only) per source and per
sample kind, top-1 agreement and KL(unpruned ‖ masked), and the normalised entropy of expert usage.

The plan `auto` keeps is the one with the best *fidelity* (`objective`: KL to the original, averaged
with equal weight per source within a modality and per modality — not token-weighted, so a few image
answers count as much as many text tokens), among the plans that lose no more on any held-out source
than the median random plan of the same size (the floor); a plan within the bootstrap noise of the best
goes to the simpler default (REAP's criterion with the REAP_MODALITY policy). When every plan fails the
floor, only the plans that breach it by no more than the best one (largest KL above the random median) can win
that tie. Merge plans (REAP_EVAL_MERGE: the merged weights swapped into the live model) compete by the same
objective, floor and noise rule, as the least simple option: merging is chosen only when every pruning plan is
measurably worse.

The held-out slice never overlaps the scored samples: built-in sets read their evaluation files;
JSONL files and image folders are split by a content hash (reap_vlm.calibration), so a sample is
in exactly one split.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import random
import time
import warnings

import numpy as np
import torch

from . import console, distributed, scoring
from .calibration import selection_slice
from .errors import PlanError
from .execution.memory import Headless, prepare_inputs
from .loading import input_device
from .masking import masked, removed_from_kept
from .methods.merge import DEFAULTS as MERGE_DEFAULTS
from .moe.spec import MoEBlock
from .observe.usage import ExpertUsage, usage_entropy

BOOTSTRAP_RESAMPLES = 1000
SEARCH_SHARE = 4  # the greedy search re-chooses one kept expert in SEARCH_SHARE per block (docs/quality.md)
RANDOM_SEEDS = (0, 1, 2)
POLICIES = ("balanced", "joint", "either")  # measured at the requested ratio beside REAP_MODALITY's
DEFAULT_CRITERION = {"router": "weighted_frequency"}  # the simpler default per scoring mode; else reap


def heldout_samples(settings):
    """The plan-selection slice (calibration.selection_slice): stratified by task and source, from the
    selection portion of the evaluation split, which the test stage never evaluates on."""
    return selection_slice(
        settings.calibration,
        per_task=settings.eval_per_task,
        per_source=settings.eval_per_source,
        max_samples=settings.eval_samples,
        seed=settings.seed,
    )


def search_samples(settings) -> list:
    """The greedy and swap searches' samples: a slice of the calibration split stratified like the plan-selection
    slice, with REAP_SEARCH_SLICE times its counts per task, per source and in all (rounded down, at least one;
    default half), so the search never sees the held-out rows that then measure its result."""

    def share(count: int) -> int:
        return max(1, int(count * settings.search_slice))

    return selection_slice(
        settings.calibration,
        per_task=share(settings.eval_per_task),
        per_source=share(settings.eval_per_source),
        max_samples=share(settings.eval_samples),
        seed=settings.seed,
        split="calibration",
    )


METRICS_CHUNK_BYTES = 256 * 2**20  # fp32 working set of one chunk of next-token positions in _token_metrics


def _position_metrics(ref_logits: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> tuple:
    """(nll, kl, overlap, top-1 agreement, top-1) of [n, V] logits against [n] targets, per position."""
    logp = torch.log_softmax(logits.float(), -1)
    ref_logp = logp if ref_logits is logits else torch.log_softmax(ref_logits.float(), -1)
    nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).double()
    ref_p = ref_logp.exp()
    kl = (ref_p * (ref_logp - logp)).sum(-1).clamp_min(0).double()
    overlap = torch.minimum(ref_p, logp.exp()).sum(-1).double()
    top1 = logp.argmax(-1)
    agree = (top1 == ref_logp.argmax(-1)).double()
    return nll, kl, overlap, agree, top1


def _by_rows(pieces: list, parts: list) -> list[list]:
    """The parts grouped by the rows their piece covers, in order."""
    groups: list[list] = []
    last = None
    for (rs, _), part in zip(pieces, parts, strict=True):
        if rs != last:
            groups.append([])
            last = rs
        groups[-1].append(part)
    return groups


def _token_metrics(
    ref_logits: torch.Tensor,
    logits: torch.Tensor,
    input_ids: torch.Tensor,
    modality: torch.Tensor,
    answer_mask: torch.Tensor | None = None,
    head=None,
    chunk_bytes: int = METRICS_CHUNK_BYTES,
    ref_head=None,
) -> dict[str, torch.Tensor]:
    """Per-row sums over next-token positions, for two sets of targets (float64 tensors of shape [B]).

    The prediction at position t is scored against the token at t + 1 (its target). `ref_logits` are the
    reference (unpruned) model's, `logits` the model under test; pass the same tensor twice for the
    reference's own loss. With `head` (a function of [n, H] hidden states to [n, V] logits: the LM head),
    the two are the final hidden states [B, T, H] instead and the logits are made chunk by chunk (`ref_head`:
    the reference's own head where the two models' heads differ; default `head`). Either
    way the positions are taken in chunks of about `chunk_bytes` of fp32 vocabulary-wide work, so the
    memory this needs does not grow with the batch, and without `head` only the given logits are full size.
    Keys, each a per-row sum over the targets of its set:

    - text targets (every real text token, prompt and answer alike, as before):
      "nll" (−log p of the target), "kl" (KL(reference ‖ model) of the next-token distributions),
      "agree" (1 where both models' top-1 is the same token), "overlap" (Σ_v min(p_ref, p), 1 = the same
      distribution), "tokens" (the number of targets);
    - answer targets (the reference answer's tokens and its end-of-turn token, Batch.answer_mask; zeros
      without one): "answer_nll", "answer_kl", "answer_agree", "answer_overlap", "answer_tokens", and
      "answer_correct": 1 where the row has an answer and the model's top-1 is the target at every answer
      position — which is exactly when greedy decoding reproduces the reference answer token for token.

    Per-token means are sum / tokens over any group of rows."""
    rows, width = input_ids.shape[0], input_ids.shape[1] - 1
    same = ref_logits is logits
    ref_head = head if ref_head is None else ref_head
    vocab = ref_logits.shape[-1] if head is None else ref_head(ref_logits[:1, :1].reshape(1, -1)).shape[-1]
    # log-softmax, exp, the products: about six fp32 tensors of [n, V] alive at once
    step = max(1, chunk_bytes // (vocab * 4 * 6))
    if step >= width:  # whole rows at a time
        group = max(1, step // max(width, 1))
        pieces = [(slice(r, r + group), slice(0, width)) for r in range(0, rows, group)]
    else:  # each row in pieces (views of the given tensors, never a copy of them)
        pieces = [(slice(r, r + 1), slice(p, min(p + step, width))) for r in range(rows) for p in range(0, width, step)]
    parts = []
    for rs, ps in pieces:
        ref_chunk = ref_logits[rs, ps].reshape(-1, ref_logits.shape[-1])
        chunk = ref_chunk if same else logits[rs, ps].reshape(-1, logits.shape[-1])
        if head is not None:
            ref_chunk = ref_head(ref_chunk)
            chunk = ref_chunk if same else head(chunk)
        targets = input_ids[rs, ps.start + 1 : ps.stop + 1].reshape(-1).to(ref_chunk.device)
        shape = (min(rs.stop, rows) - rs.start, ps.stop - ps.start)
        parts.append([v.view(shape) for v in _position_metrics(ref_chunk, chunk, targets)])
    # pieces of one row side by side, then the rows
    nll, kl, overlap, agree, top1 = (
        torch.cat([torch.cat([q[i] for q in parts_of_rows], 1) for parts_of_rows in _by_rows(pieces, parts)], 0)
        for i in range(5)
    )
    targets, modality = input_ids[:, 1:].to(nll.device), modality.to(nll.device)
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


# ---- summaries and the objective ------------------------------------------------------------

OBJECTIVES = {  # REAP_OBJECTIVE: the per-target measure of the fidelity objective
    "kl": (
        "fidelity: mean KL(original ‖ pruned) per next-token target (for samples with a reference answer: per "
        "answer token), averaged with equal weight over the sources (tasks) of a modality, then with equal weight "
        "over the modalities (text, image)"
    ),
    "tv_answers": (
        "fidelity: per next-token target KL(original ‖ pruned), and for samples with a reference answer per answer "
        "token the total variation 1 − Σ min(p_original, p_pruned) (bounded: a soft count of answer tokens whose "
        "top-1 may change), averaged with equal weight over the sources (tasks) of a modality, then with equal "
        "weight over the modalities (text, image)"
    ),
}


def _fidelity_terms(row: dict, measure: str = "kl") -> tuple[float, float]:
    """(sum of the measure, targets) a row adds to the objective: its answer tokens where it has a reference answer
    (the positions whose prediction needs the input — the question text of an image sample is the same for every
    image), else every text target. The measure is KL, or on answer tokens under `tv_answers` the total
    variation (1 − overlap per token)."""
    if row.get("answer_tokens"):
        if measure == "tv_answers":
            return row["answer_tokens"] - row["answer_overlap"], row["answer_tokens"]
        return row["answer_kl"], row["answer_tokens"]
    return row["kl"], row["tokens"]


def sample_rows(batch, reference: torch.Tensor, logits: torch.Tensor, input_ids: torch.Tensor, head=None) -> list[dict]:
    """One row per sample of the batch: its source, kind, task and id with its _token_metrics sums. Used by the
    in-memory and the streamed plan measurement, so both tables are built from the same rows. With `head`,
    `reference` and `logits` are final hidden states and `head` makes the logits (see _token_metrics)."""
    m = _token_metrics(reference, logits, input_ids, batch.modality.to(logits.device), batch.answer_mask, head)
    return [
        {
            "source": sample.source,
            "kind": sample.kind,
            "task": sample.task,
            "sample": sample.id,
            **{k: float(v[r]) for k, v in m.items()},
        }
        for r, sample in enumerate(batch.samples)
    ]


def _group(row: dict) -> str:
    """What the objective and the floor weigh equally: a source, or a source's task where rows have one."""
    return f"{row['source']}/{row['task']}" if row.get("task") else row["source"]


def _summarise(rows: list[dict]) -> dict:
    """Per-token means over the rows' text targets (loss, agreement, KL, overlap) and, where rows have
    reference answers, the loss on answer tokens and the share of answers reproduced exactly (teacher-forced
    greedy exact match)."""
    tokens = sum(r["tokens"] for r in rows)
    if tokens == 0:
        return {"tokens": 0, "loss": None, "ppl": None, "agreement": None, "kl": None}
    loss = sum(r["nll"] for r in rows) / tokens
    out = {
        "tokens": int(tokens),
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),
        "agreement": sum(r["agree"] for r in rows) / tokens,
        "kl": sum(r["kl"] for r in rows) / tokens,
    }
    if "overlap" in rows[0]:
        out["overlap"] = sum(r["overlap"] for r in rows) / tokens
    terms = [_fidelity_terms(r) for r in rows]
    targets = sum(t for _, t in terms)
    out["fidelity_kl"] = sum(k for k, _ in terms) / targets if targets else None
    answered = [r for r in rows if r.get("answer_tokens")]
    if answered:
        answer_tokens = sum(r["answer_tokens"] for r in answered)
        out["answers"] = len(answered)
        out["answer_loss"] = sum(r["answer_nll"] for r in answered) / answer_tokens
        out["answer_kl"] = sum(r["answer_kl"] for r in answered) / answer_tokens
        out["answer_accuracy"] = sum(r["answer_correct"] for r in answered) / len(answered)
    return out


def fidelity(rows: list[dict], measure: str = "kl") -> float | None:
    """The objective `auto` minimises (OBJECTIVES[measure]): per source (or task) the token-weighted mean
    KL(original ‖ pruned) over its targets (_fidelity_terms: the answer tokens of samples with a reference
    answer, every text target of the others; under `tv_answers` the answer tokens' total variation instead);
    per modality the plain mean over its sources; the plain mean over modalities. None without targets."""
    sums: dict[str, dict[str, list[float]]] = {}
    for r in rows:
        entry = sums.setdefault(r["kind"], {}).setdefault(_group(r), [0.0, 0.0])
        kl, tokens = _fidelity_terms(r, measure)
        entry[0] += kl
        entry[1] += tokens
    per_modality = []
    for sources in sums.values():
        means = [kl / tokens for kl, tokens in sources.values() if tokens > 0]
        if means:
            per_modality.append(sum(means) / len(means))
    return sum(per_modality) / len(per_modality) if per_modality else None


def _describe(per_row: list[dict], measure: str = "kl") -> dict:
    out = _summarise(per_row)
    out["objective"] = fidelity(per_row, measure)
    for field, key in (
        ("by_source", lambda r: r["source"]),
        ("by_modality", lambda r: r["kind"]),
        ("by_group", _group),
    ):
        values = sorted({key(r) for r in per_row})
        out[field] = {v: _summarise([r for r in per_row if key(r) == v]) for v in values}
    for kind, entry in out["by_modality"].items():
        entry["objective"] = fidelity([r for r in per_row if r["kind"] == kind], measure)
    return out


class Resampler:
    """Paired bootstrap of `fidelity`, stratified by source (every resample keeps every source with as many
    samples as it has), so that two plans measured on the same held-out rows can be compared beyond noise."""

    def __init__(self, rows: list[dict], seed: int, resamples: int = BOOTSTRAP_RESAMPLES, measure: str = "kl"):
        rng = np.random.default_rng(seed)
        self.measure = measure
        self.groups: list[tuple[str, np.ndarray]] = []  # (modality, [resamples, n_s] row indices)
        by_source: dict[tuple[str, str], list[int]] = {}
        for i, r in enumerate(rows):
            by_source.setdefault((r["kind"], _group(r)), []).append(i)
        for (kind, _), index in sorted(by_source.items()):
            index = np.array(index)
            self.groups.append((kind, index[rng.integers(0, len(index), size=(resamples, len(index)))]))

    def objective(self, rows: list[dict]) -> np.ndarray:
        """fidelity(rows) of every resample [resamples] (NaN where a resample has no targets at all)."""
        terms = np.array([_fidelity_terms(r, self.measure) for r in rows], dtype=float).reshape(-1, 2)
        kl, tokens = terms[:, 0], terms[:, 1]
        per_kind: dict[str, list[np.ndarray]] = {}
        for kind, draw in self.groups:
            t = tokens[draw].sum(1)
            with np.errstate(divide="ignore", invalid="ignore"):
                per_kind.setdefault(kind, []).append(np.where(t > 0, kl[draw].sum(1) / np.where(t > 0, t, 1), np.nan))
        with warnings.catch_warnings():  # a resample without targets in one modality: NaN, not a warning
            warnings.simplefilter("ignore", RuntimeWarning)
            means = [np.nanmean(np.stack(v), 0) for v in per_kind.values()]
            return np.nanmean(np.stack(means), 0) if means else np.full(1, np.nan)

    def worse(self, a: list[dict], b: list[dict]) -> tuple[bool, float, float]:
        """Is fidelity(a) worse (higher) than fidelity(b) beyond noise? 95 % interval of the difference."""
        diff = self.objective(a) - self.objective(b)
        diff = diff[np.isfinite(diff)]
        if len(diff) == 0:
            return False, 0.0, 0.0
        lo, hi = np.quantile(diff, [0.025, 0.975])
        return bool(lo > 0), float(lo), float(hi)


# ---- plans ---------------------------------------------------------------------------------------


def _n_keep(block: dict, ratio: float | None, num_keep: int, round_to: int) -> int:
    return scoring.n_keep_for(
        block["num_experts"],
        ratio=ratio,
        num_keep=num_keep if ratio is None else 0,
        top_k=block["top_k"],
        round_to=round_to,
        n_group=block.get("n_group", 1),
    )


def random_plan(blocks_meta: list[dict], *, ratio, num_keep: int, round_to: int, seed: int) -> dict[str, list[int]]:
    """A uniformly random plan of the same size as the criteria's (the same count in every routing group)."""
    rng = random.Random(seed)
    out = {}
    for block in blocks_meta:
        n_keep, n_group = _n_keep(block, ratio, num_keep, round_to), block.get("n_group", 1)
        groups = (
            np.array_split(np.arange(block["num_experts"]), n_group)
            if n_group > 1
            else [np.arange(block["num_experts"])]
        )
        out[block["key"]] = sorted(j for g in groups for j in rng.sample(g.tolist(), n_keep // len(groups)))
    return out


VISION_TOWERS = ("visual", "vision_tower", "vision_model", "vision_encoder")  # the encoders' module names


class _VisionOnce:
    """The image encoder runs once per batch, not once per plan: inside the context every module's
    `get_image_features` (transformers' VLMs compute the vision tower's output there) returns the batch's first
    result until `next_batch()`. Exact, because masking only touches decoder MoE blocks: used only when the
    model has a vision tower (a module named as in VISION_TOWERS) and no MoE block lives inside one."""

    def __init__(self, model, blocks: list[MoEBlock]):
        towers = [name for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in VISION_TOWERS]
        inside = any(b.block.startswith(t + ".") or b.experts.startswith(t + ".") for b in blocks for t in towers)
        self.owners = (
            [m for m in model.modules() if callable(getattr(m, "get_image_features", None))]
            if towers and not inside
            else []
        )
        self.cached: dict[int, object] = {}

    def next_batch(self) -> None:
        self.cached.clear()

    def __enter__(self):
        for m in self.owners:
            original = m.get_image_features

            def once(*args, _original=original, _key=id(m), **kwargs):
                if _key not in self.cached:
                    self.cached[_key] = _original(*args, **kwargs)
                return self.cached[_key]

            m.get_image_features = once  # an instance attribute: the class's method stays as it is
        return self

    def __exit__(self, *exc):
        for m in self.owners:
            m.__dict__.pop("get_image_features", None)
        self.cached.clear()
        return False


def _run_plans(
    model,
    blocks: list[MoEBlock],
    batches: list,
    plans: list[dict],
    *,
    usage: bool,
    progress=None,
    swaps=None,
    sharded: bool = False,
):
    """Per-sample rows of the unpruned model and of every plan (masked), and expert usage counts per plan
    (index 0: unpruned) when `usage`. swaps[i] (merge plans): weights swapped in while plan i runs."""
    if not sharded and distributed.active():  # data parallel: this rank's batches, every rank's rows back in order
        kwargs = dict(usage=usage, progress=progress, swaps=swaps, sharded=True)
        return distributed.run_plans(_run_plans, model, blocks, batches, plans, **kwargs)
    if hasattr(model, "run_plans"):  # streamed execution: the same rows, one decoder layer at a time
        return model.run_plans(blocks, batches, plans, usage=usage, progress=progress, swaps=swaps)
    per_plan_rows: list[list[dict]] = [[] for _ in plans]
    baseline_rows: list[dict] = []
    counts = [{b.key: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks} for _ in range(len(plans) + 1)]
    device = input_device(model)
    headless = Headless(model)  # final hidden states + the LM head: logits made a chunk at a time
    observing = ExpertUsage(model, blocks) if usage else None
    forwards = len(batches) * (len(plans) + 1)
    if progress:
        progress(0, forwards)
    with contextlib.ExitStack() as stack, torch.inference_mode():
        if observing is not None:
            stack.enter_context(observing)
        vision = stack.enter_context(_VisionOnce(model, blocks))
        # batches outer, plans inner: the reference logits of one batch are all that is kept
        for bi, batch in enumerate(batches):
            vision.next_batch()
            inputs = prepare_inputs(model, batch, device)
            reference = None
            for pi in range(-1, len(plans)):
                if observing is not None:
                    observing.batch(batch.modality)
                    before = observing.totals()
                if pi == -1:
                    reference, head = headless.run(inputs)
                    logits = reference
                else:
                    swap = swaps[pi] if swaps and swaps[pi] is not None else None
                    with contextlib.ExitStack() as weights:
                        if swap is not None:
                            from .methods.merge_memory import swapped

                            weights.enter_context(swapped(swap))
                        weights.enter_context(masked(model, blocks, removed_from_kept(blocks, plans[pi])))
                        logits, head = headless.run(inputs)
                if observing is not None:
                    for key, total in observing.totals().items():
                        counts[pi + 1][key] += total - before[key]
                rows = baseline_rows if pi == -1 else per_plan_rows[pi]
                rows.extend(sample_rows(batch, reference, logits, inputs["input_ids"], head))
                if progress:
                    progress(bi * (len(plans) + 1) + pi + 2, forwards)
    return baseline_rows, per_plan_rows, counts


def greedy_steps(blocks_meta: list[dict], ratio, num_keep: int, round_to: int = 1) -> int:
    """How many add-back steps greedy_plan takes (each one a measurement of all its trial plans, and the next
    step's trials built from its result, so the steps run one after another): one per SEARCH_SHARE kept
    experts of the smallest block, at most kept - top_k. PlanError where the search cannot run."""
    if any(b.get("n_group", 1) > 1 for b in blocks_meta):
        raise PlanError("greedy search does not handle group-limited routing", "", "")
    steps = None
    for block in blocks_meta:
        n_keep = _n_keep(block, ratio, num_keep, round_to)
        s = min(max(1, n_keep // SEARCH_SHARE), n_keep - block["top_k"])
        if s <= 0:
            raise PlanError("no room for a search: the plan keeps only top_k experts", "", "")
        steps = s if steps is None else min(steps, s)
    return steps


def greedy_evaluations(shortlist_sizes: dict[str, int], steps: int) -> int:
    """The evaluations greedy_plan spends: at each of `steps` steps one trial plan per shortlisted expert not yet
    added (each step adds one per block) and the unpruned reference."""
    return sum(sum(max(n - step, 0) for n in shortlist_sizes.values()) + 1 for step in range(steps))


def greedy_plan(
    model,
    blocks: list[MoEBlock],
    meta: dict,
    search_batches: list,
    *,
    criterion: str,
    modality: str,
    ratio,
    num_keep: int,
    round_to: int = 1,
    protect_super: bool = True,
    super_factor: float = 10.0,
    progress=None,
    measure: str = "kl",
    budget: int = 0,
) -> tuple[dict[str, list[int]], dict]:
    """Greedy add-back by measured effect. Start from the `criterion`/`modality` plan with `s` experts fewer
    per block (s = 1 per SEARCH_SHARE kept); then, s times, measure (masked, on `search_batches`) the fidelity objective
    of adding each expert of a shortlist to its block, and add each block's best one. The shortlist of a
    block: the next s + 1 experts of the base ranking and the s best-ranked by text alone and by image alone
    that are not kept. `measure`: the objective's per-target measure (OBJECTIVES).
    `budget` (> 0): the most evaluations (one plan over the search batches; each step's
    unpruned reference counts one) it may spend; a search that needs more is refused (PlanError) before the
    first measurement (greedy_evaluations), or before a step that would pass it.
    Returns (kept per block, what the search did)."""
    started = time.perf_counter()
    blocks_meta = meta["model"]["blocks"]
    steps = greedy_steps(blocks_meta, ratio, num_keep, round_to)
    kept: dict[str, list[int]] = {}
    shortlist: dict[str, list[int]] = {}
    for block in blocks_meta:
        key, stats = block["key"], meta["layers"][block["key"]]["stats"]
        n_keep = _n_keep(block, ratio, num_keep, round_to)
        base, _ = scoring.select(
            stats,
            criterion=criterion,
            n_keep=n_keep - steps,
            modality=modality,
            protect_super=protect_super,
            super_factor=super_factor,
        )
        ranking = scoring._ranked(scoring.modality_scores(stats, criterion, modality), np.arange(block["num_experts"]))
        pool = [j for j in ranking if j not in base][: steps + 1]
        for by in ("text", "image"):
            if by in stats and (stats[by].get("tokens") or 0) > 0:
                ranked = scoring._ranked(
                    scoring.criterion_scores(stats[by], criterion), np.arange(block["num_experts"])
                )
                pool += [j for j in ranked if j not in base and j not in pool][:steps]
        kept[key], shortlist[key] = list(base), pool
    needed = greedy_evaluations({key: len(pool) for key, pool in shortlist.items()}, steps)
    if budget and needed > budget:
        raise PlanError(
            "the greedy search needs more evaluations than its budget",
            f"{needed} evaluations ({steps} steps over {len(kept)} blocks, {needed // steps} a step at most), "
            f"REAP_GREEDY_BUDGET is {budget}",
            "Raise REAP_GREEDY_BUDGET (0 = no limit), or set REAP_GREEDY_SEARCH=false",
        )
    evaluations = 0
    history = []
    for step in range(steps):
        trials = [(key, j) for key in kept for j in shortlist[key] if j not in kept[key]]
        plans = [{**kept, key: sorted([*kept[key], j])} for key, j in trials]
        if budget and evaluations + len(plans) + 1 > budget:  # a block without a measurable option did not shrink
            raise PlanError(
                "the greedy search needs more evaluations than its budget",
                f"step {step + 1} of {steps} would pass REAP_GREEDY_BUDGET={budget} ({evaluations} spent)",
                "Raise REAP_GREEDY_BUDGET (0 = no limit), or set REAP_GREEDY_SEARCH=false",
            )
        report = None
        if progress:  # the total assumes later steps as large as this one (they are at most as large)
            done, left = evaluations * len(search_batches), steps - step

            def report(n, total, done=done, left=left):
                progress(done + n, done + total * left)

        _, rows, _ = _run_plans(model, blocks, search_batches, plans, usage=False, progress=report)
        evaluations += len(plans) + 1
        scores = [fidelity(r, measure) for r in rows]
        added = {}
        for key in kept:
            options = [(scores[i], j) for i, (k, j) in enumerate(trials) if k == key and scores[i] is not None]
            if options:
                best_score, best = min(options)
                added[key] = (best, best_score)
        for key, (j, _) in added.items():
            kept[key] = sorted([*kept[key], j])
        history.append({key: j for key, (j, _) in added.items()})
    info = {
        "base": f"{criterion}/{modality}",
        "added_per_block": steps,
        "shortlist": shortlist,
        "added": history,
        "evaluations": evaluations,
        "budget": budget,
        "search_samples": sum(len(b.samples) for b in search_batches),
        "seconds": round(time.perf_counter() - started, 3),
    }
    return kept, info


SWAP_PAIRS = 4  # exact swap trials per block step: the best pairs by the drop/add screening (swap_search)


def swap_search(
    evaluate,
    start: dict[str, list[int]],
    num_experts: dict[str, int],
    *,
    budget: int,
    min_keep: dict[str, int],
    pairs: int = SWAP_PAIRS,
    progress=None,
) -> tuple[dict[str, list[int]], dict]:
    """Local search over plans that keep as many experts per block as `start`, minimising `evaluate`.

    evaluate(plans) -> (scores, cost): one score per plan (lower is better, None = not measurable) and the
    evaluations it spent (the masked measurement: one per plan plus one for the unpruned reference). At most
    `budget` evaluations in all, the first measurement of `start` included.

    When every plan of that size fits the budget (the product over blocks of C(E, k)), they are all measured and
    the best is returned: the exact optimum. Otherwise, block after block in turn: measure the plan with each
    kept expert dropped and with each removed expert added (the screening, E plans; drops only where k - 1 is at
    least `min_keep`), estimate each swap (kept i out, removed j in) by the sum of the two measured changes,
    measure the `pairs` best estimated swaps exactly (every swap, without screening, when there are no more
    than that or drops are not possible) and take the best one if it beats the current plan. Stops after a
    turn over every block without an improvement, or when the next step would exceed the budget. A budget that
    does not cover one turn over every block is refused (PlanError): a partial turn only tries the first blocks.
    Returns (plan, what the search did)."""
    started = time.perf_counter()
    keys = list(start)
    current = {k: sorted(start[k]) for k in keys}
    sizes = {k: len(current[k]) for k in keys}
    spent = 0
    history: list[dict] = []

    def measure(plans: list[dict]) -> list:
        nonlocal spent
        scores, cost = evaluate(plans)
        spent += cost
        if progress:
            progress(spent, budget)
        return scores

    space = math.prod(math.comb(num_experts[k], sizes[k]) for k in keys)
    if space + 1 <= budget:  # exhaustive: every plan of this size (one reference forward)
        combos = itertools.product(*(itertools.combinations(range(num_experts[k]), sizes[k]) for k in keys))
        plans = [{k: list(c) for k, c in zip(keys, combo, strict=True)} for combo in combos]
        scores = measure(plans)
        measured = [(s, i) for i, s in enumerate(scores) if s is not None]
        if not measured:
            raise PlanError("no plan of the search could be measured", "", "")
        best, i = min(measured)
        info = {"mode": "exhaustive", "plans": len(plans), "objective": best, "evaluations": spent, "swaps": []}
        return plans[i], {**info, "seconds": round(time.perf_counter() - started, 3)}

    def step_cost(key: str) -> int:  # the evaluations of one block step (as in the loop below)
        k, out = sizes[key], num_experts[key] - sizes[key]
        if k * out == 0:
            return 0
        if k - 1 >= min_keep[key] and k * out > pairs:
            return num_experts[key] + 1 + min(pairs, k * out) + 1
        return k * out + 1

    turn_cost = 2 + sum(step_cost(k) for k in keys)
    if turn_cost > budget:  # a partial turn would only ever try the first blocks
        raise PlanError(
            "the search budget does not cover one step in every block",
            f"a turn over the {len(keys)} blocks takes {turn_cost} evaluations, the budget is {budget}",
            "Raise REAP_SEARCH_BUDGET, or set it to 0",
        )
    (value,) = measure([current])
    if value is None:
        raise PlanError("the search's start plan could not be measured", "", "")
    start_value = value
    failed, turn, steps = 0, 0, 0
    while failed < len(keys):
        key = keys[turn % len(keys)]
        turn += 1
        kept = current[key]
        out = [j for j in range(num_experts[key]) if j not in kept]
        swaps = [(i, j) for i in kept for j in out]
        can_drop = len(kept) - 1 >= min_keep[key]
        if not swaps:
            failed += 1
            continue

        def with_block(new_kept, key=key, current=current):
            return {**current, key: sorted(new_kept)}

        if can_drop and len(swaps) > pairs:
            if spent + len(kept) + len(out) + 1 + min(pairs, len(swaps)) + 1 > budget:
                break
            screen = [with_block([x for x in kept if x != i]) for i in kept] + [with_block([*kept, j]) for j in out]
            scores = measure(screen)
            drop = dict(zip(kept, scores[: len(kept)], strict=True))
            add = dict(zip(out, scores[len(kept) :], strict=True))
            estimated = [
                ((drop[i] - value) + (add[j] - value), i, j)
                for i, j in swaps
                if drop[i] is not None and add[j] is not None
            ]
            trials = [(i, j) for _, i, j in sorted(estimated)[:pairs]]
        else:
            if spent + len(swaps) + 1 > budget:
                break
            trials = swaps
        if not trials:
            failed += 1
            continue
        steps += 1
        scores = measure([with_block([x for x in kept if x != i] + [j]) for i, j in trials])
        measured = [(s, i, j) for s, (i, j) in zip(scores, trials, strict=True) if s is not None]
        best = min(measured) if measured else None
        if best is not None and best[0] < value:
            value, i, j = best
            current = with_block([x for x in kept if x != i] + [j])
            history.append({"block": key, "out": i, "in": j, "objective": value})
            failed = 0
            console.step(
                f"swap search, block {key}: expert {i} out, {j} in: objective {value:.5f} ({spent} evaluations)"
            )
        else:
            failed += 1
            console.step(f"swap search, block {key}: no better swap ({spent} evaluations)")
    info = {
        "mode": "swap",
        "start_objective": start_value,
        "objective": value,
        "swaps": history,
        "block_steps": steps,
        "local_optimum": failed >= len(keys),
        "evaluations": spent,
        "seconds": round(time.perf_counter() - started, 3),
    }
    return current, info


def search_evaluator(model, blocks: list[MoEBlock], search_batches: list, measure: str = "kl"):
    """evaluate(plans) -> (fidelity of each plan on `search_batches` with the per-target `measure`, evaluations
    spent) for swap_search."""

    def evaluate(plans: list[dict]) -> tuple[list, int]:
        _, rows, _ = _run_plans(model, blocks, search_batches, plans, usage=False)
        return [fidelity(r, measure) for r in rows], len(plans) + 1

    return evaluate


def swap_plan(
    model,
    blocks: list[MoEBlock],
    meta: dict,
    search_batches: list,
    *,
    start: dict[str, list[int]],
    start_label: str,
    budget: int,
    progress=None,
    measure: str = "kl",
) -> tuple[dict[str, list[int]], dict]:
    """swap_search from `start` on the search slice (the fidelity objective with the per-target `measure`,
    masked), at most `budget` evaluations. Returns (kept per block, what the search did)."""
    blocks_meta = meta["model"]["blocks"]
    if any(b.get("n_group", 1) > 1 for b in blocks_meta):
        raise PlanError("the swap search does not handle group-limited routing", "", "")
    kept, info = swap_search(
        search_evaluator(model, blocks, search_batches, measure),
        start,
        {b["key"]: b["num_experts"] for b in blocks_meta},
        budget=budget,
        min_keep={b["key"]: b["top_k"] for b in blocks_meta},
        progress=progress,
    )
    info.update(
        base=start_label,
        budget=budget,
        search_samples=sum(len(b.samples) for b in search_batches),
    )
    return kept, info


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
    policies=(),
    round_to: int = 1,
    protect_super: bool = True,
    super_factor: float = 10.0,
    random_seeds=RANDOM_SEEDS,
    search_batches: list | None = None,
    greedy_base: str | None = None,
    progress=None,
    merge_stats: dict | None = None,
    search_progress=None,
    merge_settings: dict | None = None,
    search_budget: int = 0,
    swap_progress=None,
    measure: str = "kl",
    greedy_budget: int = 0,
) -> dict:
    """Measure every candidate: criteria under `modality` at every ratio; at the first ratio also under every
    other policy of `policies`, the greedy search (with `search_batches`, from `greedy_base`), the swap search
    from the greedy plan (at most `search_budget` evaluations on `search_batches`; 0 = none) and
    `random_seeds` random plans. Each distinct plan runs once.

    With `merge_stats` (the merge statistics per block key), merging with `greedy_base`'s saliency and
    `merge_settings` (grouping, group_size, router; MERGE_DEFAULTS) is measured at the first ratio too (policy
    "merge"; the one `choose` decides at: each merge costs an alignment of every layer): the merged weights
    swapped into the live model, the other group members masked. `measure`: the objective's per-target measure
    (OBJECTIVES), for the searches and the table's objective column."""
    started = time.perf_counter()
    blocks_meta = meta["model"]["blocks"]
    candidates: list[dict] = []
    notes: list[str] = []
    by_signature: dict[tuple, int] = {}
    plans: list[dict] = []
    cut = dict(num_keep=num_keep, round_to=round_to, protect_super=protect_super, super_factor=super_factor)

    swaps: list = []

    def add(kept: dict[str, list[int]], swap=None, **info) -> None:
        signature = tuple(tuple(kept[b.key]) for b in blocks) + ((id(swap),) if swap is not None else ())
        if signature not in by_signature:
            by_signature[signature] = len(plans)
            plans.append(kept)
            swaps.append(swap)
        candidates.append({**info, "plan": by_signature[signature], "n_keep": {k: len(v) for k, v in kept.items()}})

    greedy_seconds = merge_seconds = 0.0
    for i, ratio in enumerate(ratios):
        measured_policies = [modality] + ([p for p in policies if p != modality] if i == 0 else [])
        for policy in measured_policies:
            for criterion in criteria:
                try:
                    plan = scoring.plan(
                        meta["layers"],
                        blocks_meta,
                        criterion=criterion,
                        ratio=ratio,
                        num_keep=num_keep if ratio is None else 0,
                        modality=policy,
                        round_to=round_to,
                        protect_super=protect_super,
                        super_factor=super_factor,
                    )
                except PlanError as err:
                    notes.append(f"{criterion}/{policy} at ratio {ratio}: skipped ({err.what})")
                    continue
                add({k: v["kept"] for k, v in plan.items()}, criterion=criterion, policy=policy, ratio=ratio)
        if i == 0 and search_batches and greedy_base:
            base_criterion, base_policy = greedy_base.split("/")
            try:
                kept, search = greedy_plan(
                    model,
                    blocks,
                    meta,
                    search_batches,
                    criterion=base_criterion,
                    modality=base_policy,
                    ratio=ratio,
                    progress=search_progress,
                    measure=measure,
                    budget=greedy_budget,
                    **cut,
                )
                greedy_seconds = search["seconds"]
                add(kept, criterion=base_criterion, policy="greedy", ratio=ratio, search=search)
                start, start_label = kept, f"greedy from {greedy_base}"
            except PlanError as err:
                notes.append(f"greedy at ratio {ratio}: skipped ({err.line()})")
                start, start_label = None, greedy_base
            if search_budget > 0:  # streamed execution: each measurement one more pass (StreamedModel.run_plans)
                try:
                    if start is None:
                        base = scoring.plan(
                            meta["layers"],
                            blocks_meta,
                            criterion=base_criterion,
                            ratio=ratio,
                            modality=base_policy,
                            **cut,
                        )
                        start = {k: v["kept"] for k, v in base.items()}
                    kept, search = swap_plan(
                        model,
                        blocks,
                        meta,
                        search_batches,
                        start=start,
                        start_label=start_label,
                        budget=search_budget,
                        progress=swap_progress,
                        measure=measure,
                    )
                    add(kept, criterion=base_criterion, policy="swap", ratio=ratio, search=search)
                except PlanError as err:
                    notes.append(f"swap search at ratio {ratio}: skipped ({err.line()})")
        for seed in random_seeds if i == 0 else ():  # the floor compares at the requested ratio
            try:
                kept = random_plan(blocks_meta, ratio=ratio, num_keep=num_keep, round_to=round_to, seed=seed)
            except PlanError as err:
                notes.append(f"random plan at ratio {ratio}: skipped ({err.what})")
                break
            add(kept, criterion="random", policy="random", ratio=ratio, seed=seed)
        if i == 0 and merge_stats is not None and greedy_base:  # where auto chooses
            t0 = time.perf_counter()
            try:
                kept, swap, info = _merge_candidate(
                    model, blocks, meta, merge_stats, greedy_base, ratio, num_keep, round_to, merge_settings
                )
                add(kept, swap, criterion=greedy_base.split("/")[0], policy="merge", ratio=ratio, merge=info)
            except PlanError as err:
                notes.append(f"merge at ratio {ratio}: skipped ({err.what})")
            merge_seconds += time.perf_counter() - t0

    baseline_rows, per_plan_rows, plan_counts = _run_plans(
        model, blocks, eval_batches, plans, usage=True, progress=progress, swaps=swaps
    )

    def entropy(counts: dict[str, torch.Tensor], kept: dict[str, list[int]] | None) -> float:
        """Mean over blocks of the normalised usage entropy; 1 = every kept expert equally used."""
        values = [usage_entropy(c, len(kept[key]) if kept else len(c)) for key, c in counts.items()]
        return float(np.mean([1.0 if v is None else v for v in values]))

    usage = [entropy(plan_counts[pi + 1], None if pi == -1 else plans[pi]) for pi in range(-1, len(plans))]
    baseline = {**_describe(baseline_rows, measure), "entropy": usage[0]}
    described = [_describe(rows, measure) for rows in per_plan_rows]
    rows = []
    for c in candidates:
        row = {
            "criterion": c["criterion"],
            "policy": c["policy"],
            "ratio": c["ratio"],
            "n_keep": c["n_keep"],
            "plan_id": c["plan"],
            **described[c["plan"]],
            "entropy": usage[c["plan"] + 1],
        }
        for extra in ("seed", "search", "merge"):
            if extra in c:
                row[extra] = c[extra]
        rows.append(row)
    random_median = _random_medians(rows)
    for row in rows:
        if row["policy"] != "random":
            row["floor"] = _floor(row, random_median.get(_ratio_key(row["ratio"])))
    heldout_tokens = {"samples": len(baseline_rows), "text_targets": int(sum(r["tokens"] for r in baseline_rows))}
    return {
        "objective": OBJECTIVES[measure],
        "measure": measure,
        "baseline": baseline,
        "rows": rows,
        "random_median": random_median,
        "notes": notes,
        "heldout": heldout_tokens,
        "plans_evaluated": len(plans),
        "greedy_seconds": greedy_seconds,
        "merge_seconds": round(merge_seconds, 3),  # grouping, alignment and averaging of the merge plans
        "seconds": round(time.perf_counter() - started, 3),
        "plans": plans,
        "_rows": {"baseline": baseline_rows, "plans": per_plan_rows},
    }


def _merge_candidate(
    model, blocks, meta, merge_stats, base: str, ratio, num_keep: int, round_to: int, settings: dict | None = None
):
    """(kept centroids, weight swap, description) of merging at this ratio with `base`'s saliency
    (criterion/policy) and `settings` (MERGE_DEFAULTS): exactly what the prune stage's merge method writes
    from the same metadata, statistics and settings."""
    from .methods import merge_checkpoint, merge_memory

    settings = {**MERGE_DEFAULTS, **(settings or {})}
    criterion, policy = base.split("/")
    counts = {_n_keep(b, ratio, num_keep, round_to) for b in meta["model"]["blocks"]}
    if len(counts) != 1:
        raise PlanError("the blocks would keep different numbers of experts", "", "")
    k = counts.pop()
    groups, saliency, acts = merge_checkpoint.build_groups(
        meta,
        merge_stats,
        k,
        criterion,
        grouping=settings["grouping"],
        group_size=settings["group_size"],
        modality=policy,
    )
    kept = {f"{layer}.{s}": sorted(g[0] for g in gs) for (layer, s), gs in groups.items()}
    if hasattr(model, "run_plans"):  # streamed: the statistics' pass measured it layer by layer (plans.MergeCut)
        from .execution.plans import merge_key

        swap = merge_key(base, ratio, settings["grouping"], settings["group_size"], settings["router"])
        return kept, swap, {**settings, "base": base}
    # the merged experts are kept in host memory and copied in only while the merge plan runs a batch: on a
    # GPU they would add the merged centroids of every layer (and their saved originals) to the stage's peak
    swap = merge_memory.prepare(model, blocks, groups, saliency, acts, router_mode=settings["router"], device="cpu")
    return kept, swap, {**settings, "base": base}


def _ratio_key(ratio) -> str:
    return "num_keep" if ratio is None else f"{ratio:g}"


def _random_medians(rows: list[dict]) -> dict[str, dict[str, float]]:
    """Per ratio and held-out source (or task): the median over the random plans of its KL to the original (on the
    objective's targets, _fidelity_terms)."""
    out: dict[str, dict[str, float]] = {}
    for ratio in {_ratio_key(r["ratio"]) for r in rows if r["policy"] == "random"}:
        randoms = [r for r in rows if r["policy"] == "random" and _ratio_key(r["ratio"]) == ratio]
        groups = sorted({g for r in randoms for g in r["by_group"]})
        out[ratio] = {}
        for g in groups:
            values = [
                r["by_group"][g]["fidelity_kl"]
                for r in randoms
                if r["by_group"].get(g, {}).get("fidelity_kl") is not None
            ]
            if values:
                out[ratio][g] = float(np.median(values))
    return out


def _floor(row: dict, medians: dict[str, float] | None) -> dict:
    """The per-source floor: does this plan lose more (higher KL to the original) on some held-out source
    (or task) than the median random plan of the same size? Graded: `worst_excess` is the largest KL above the
    random median over the sources (0 when the floor passes; in the objective's own units: a source's KL is one
    term of its mean), `worst_source` where. An excess and not a ratio: some tasks' random medians are near 0
    (a random plan at 25 % barely touches them), where a tiny KL is a large ratio."""
    if not medians:
        return {"ok": True, "checked": False, "worse_sources": {}}
    worse = {
        g: {"kl": row["by_group"][g]["fidelity_kl"], "random_median_kl": m}
        for g, m in medians.items()
        if row["by_group"].get(g, {}).get("fidelity_kl") is not None and row["by_group"][g]["fidelity_kl"] > m
    }
    excess = {g: v["kl"] - v["random_median_kl"] for g, v in worse.items()}
    worst = max(excess, key=excess.get) if excess else None
    return {
        "ok": not worse,
        "checked": True,
        "worse_sources": worse,
        "worst_excess": excess[worst] if worst else 0.0,
        "worst_source": worst,
    }


def _worst_excess(row: dict) -> float:
    return row["floor"].get("worst_excess", 0.0)


# ---- the choice ------------------------------------------------------------------------------------


def _label(row: dict) -> str:
    if row["policy"] == "random":
        return f"random (seed {row['seed']})"
    if row["policy"] == "greedy":
        return f"greedy from {row['search']['base']}"
    if row["policy"] == "swap":
        return f"swap search from {row['search']['base']}"
    if row["policy"] == "merge":
        m = row["merge"]
        how = f"{m['grouping']} C {m['group_size']}" if m["grouping"] == "ream" else m["grouping"]
        return f"merge from {m['base']} ({how}, {m['router']} router)"
    return f"{row['criterion']}/{row['policy']}"


def choose(table: dict, *, requested, default: tuple[str, str], fixed: tuple[str, str] | None, seed: int) -> dict:
    """The plan to keep among the table's rows at the requested ratio (random plans never).

    auto (fixed=None): among the plans that pass the per-source floor (every plan when none does, flagged),
    find the best objective; then walk the plans from the simplest — the default (criterion, policy) first,
    then the other criteria of the default policy, the other policies, the greedy search, the swap search,
    merging last — and keep the first that is not measurably worse than the best (paired, source-stratified
    bootstrap, 95 %). When no plan passes, the floor is graded: the walk only considers the plans whose
    worst breach (the largest KL above the random median over the sources) is at most the best plan's, so a
    simpler plan that breaches more cannot win the tie.
    fixed: that (criterion, policy), with a note when another pruning plan is measurably better or it fails
    the floor (merge plans are not candidates then).
    The result's `method` is "merge" for a merge plan (then `policy` is its saliency's modality policy and
    `merge` its settings), else "prune"."""
    rows = [
        r
        for r in table["rows"]
        if r["ratio"] == requested and r["policy"] != "random" and (fixed is None or r["policy"] != "merge")
    ]
    rows = [r for r in rows if r["objective"] is not None]
    if not rows:
        return {}
    per_plan = table["_rows"]["plans"]
    resampler = Resampler(table["_rows"]["baseline"], seed, measure=table.get("measure", "kl"))
    passing = [r for r in rows if r["floor"]["ok"]]
    pool = passing or rows
    best = min(pool, key=lambda r: r["objective"])

    def tier(r: dict) -> int:
        if (r["criterion"], r["policy"]) == default:
            return 0
        return 1 if r["policy"] == default[1] else {"greedy": 3, "swap": 4, "merge": 5}.get(r["policy"], 2)

    if fixed is None:
        chosen, interval = None, (0.0, 0.0)
        walk = pool if passing else [r for r in pool if _worst_excess(r) <= _worst_excess(best)]
        for r in sorted(walk, key=lambda r: (tier(r), r["objective"])):
            worse, lo, hi = resampler.worse(per_plan[r["plan_id"]], per_plan[best["plan_id"]])
            if not worse:
                chosen, interval = r, (lo, hi)
                break
        chosen = chosen or best
        if chosen is best:
            why = f"best objective {best['objective']:.5f}"
        else:
            why = (
                f"objective {chosen['objective']:.5f}, within the noise of the best ({_label(best)}, "
                f"{best['objective']:.5f}; 95% bootstrap interval of the difference "
                f"[{interval[0]:.5f}, {interval[1]:.5f}]), and simpler"
            )
        reason = f"auto: {_label(chosen)}: {why}, among {len(pool)} plans at ratio {requested}"
        if not passing:
            reason += "; WARNING: every plan loses more on some held-out source than the median random plan"
            reason += (
                f"; graded floor: only the {len(walk)} plans whose worst breach is at most the best's "
                f"(KL {_worst_excess(best):.4f} above the random median on {best['floor'].get('worst_source')}) "
                f"could win the tie ({len(pool) - len(walk)} breach more)"
            )
        elif len(passing) < len(rows):
            reason += f" passing the per-source floor ({len(rows) - len(passing)} refused)"
    else:
        chosen = next((r for r in rows if (r["criterion"], r["policy"]) == fixed), None)
        if chosen is None:
            return {}
        worse, lo, hi = resampler.worse(per_plan[chosen["plan_id"]], per_plan[best["plan_id"]])
        reason = "fixed by REAP_CRITERION"
        if worse:
            reason += (
                f"; note: {_label(best)} is measurably better on held-out data (objective {best['objective']:.5f} "
                f"vs {chosen['objective']:.5f}, 95% bootstrap interval of the difference [{lo:.5f}, {hi:.5f}])"
            )
    if not chosen["floor"]["ok"]:
        worst = ", ".join(
            f"{s} (KL {v['kl']:.4f} > random median {v['random_median_kl']:.4f})"
            for s, v in chosen["floor"]["worse_sources"].items()
        )
        reason += f"; WARNING: below the per-source floor on {worst}"
    merged = chosen["policy"] == "merge"
    out = {
        "method": "merge" if merged else "prune",
        "criterion": chosen["criterion"],
        "policy": chosen["merge"]["base"].split("/")[1] if merged else chosen["policy"],
        "ratio": requested,
        "plan_id": chosen["plan_id"],
        "label": _label(chosen),
        "objective": chosen["objective"],
        "loss": chosen["loss"],
        "floor": chosen["floor"],
        "best_measured": _label(best),
        "best_objective": best["objective"],
        "reason": reason,
    }
    if merged:
        out["merge"] = {k: chosen["merge"][k] for k in MERGE_DEFAULTS}
    return out


def measure_and_choose(
    model, blocks: list[MoEBlock], meta: dict, eval_batches: list, settings, search_batches=None, merge_stats=None
):
    """(chosen, table): `chosen` has the criterion, the policy, the kept plan and the reason (empty when
    nothing could be measured); `table` is every candidate's measurement (the metadata's candidates)."""
    mode = settings.scoring_mode
    criteria = scoring.available_criteria(mode)
    requested = None if settings.num_keep else settings.prune_ratio
    ratios = [requested] + [r for r in settings.candidate_ratios if r != requested]
    default_criterion = DEFAULT_CRITERION.get(mode, "reap")
    fixed = None if settings.criterion == "auto" else (settings.criterion, settings.modality)
    with (
        console.steps("greedy search", "forwards") as search_progress,
        console.steps("swap search", "evaluations") as swap_progress,
        console.steps("measuring plans", "forwards") as progress,
    ):
        table = measure_plans(
            model,
            blocks,
            meta,
            eval_batches,
            criteria=criteria,
            ratios=ratios,
            num_keep=settings.num_keep,
            modality=settings.modality,
            policies=POLICIES if fixed is None else (),
            round_to=settings.round_to,
            protect_super=settings.protect_super_experts,
            super_factor=settings.super_expert_factor,
            search_batches=search_batches if fixed is None else None,
            greedy_base=f"{default_criterion}/{settings.modality}",
            merge_stats=merge_stats if settings.eval_merge else None,
            merge_settings={
                "grouping": settings.merge_grouping,
                "group_size": settings.merge_group_size,
                "router": settings.merge_router,
            },
            progress=progress,
            search_progress=search_progress,
            search_budget=settings.search_budget if fixed is None else 0,
            greedy_budget=settings.greedy_budget,
            swap_progress=swap_progress,
            measure=settings.objective,
        )
    chosen = choose(
        table, requested=requested, default=(default_criterion, settings.modality), fixed=fixed, seed=settings.seed
    )
    table.pop("_rows")
    if chosen:
        table["chosen"] = dict(chosen)
        chosen["kept"] = table["plans"][chosen["plan_id"]]
    return chosen, table
