"""The scoring stage: model + calibration → per-expert statistics → keep plan → reap_metadata.json."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from . import console, distributed, metadata, outputs, scoring
from .calibration import BUILTIN, SELECTION_SHARE, load_samples, make_batches, parse_spec, token_budget
from .errors import PlanError, SettingsError
from .execution import choose as choose_execution
from .execution.memory import forward, prepare_batches
from .execution.vision import group_vision_attention
from .loading import input_device, load_model, read_config
from .moe import find_moe_blocks
from .observe import Observer
from .phases import Phases, print_summary
from .settings import RECIPE_NAME, ReapSettings, dump, recipe_text, recipe_values
from .validate import read_accumulators

CHECKPOINT_NAME = ".reap_accumulators.pt"
BATCHING = "buckets by kind and length, batch_size x max_seq_len positions"  # calibration.make_batches(bucket=True)
GATE_DEFINITION = (
    "g = top_k_weights and top-k sets as passed by the model to its experts module (forward hook / "
    "experts interface; Llama 4: the router's top-k scores); p = {fn} of the router module's logits"
)


def _check_paths(settings: ReapSettings) -> Path:
    if settings.model_path is None:
        raise SettingsError(
            "REAP_MODEL_PATH is not set",
            "the reap stage needs a model to score",
            "Set REAP_MODEL_PATH in .env or pass --model-path",
        )
    # the metadata's folder also gets the settings, the plots and the accumulator checkpoint
    return outputs.guard_file(
        settings.metadata_file,
        what="metadata path",
        setting="REAP_OUTPUT_PATH (or --metadata-path)",
        models=[settings.model_path],
    )


def _expert_shapes(model, blocks) -> dict:
    shapes = {}
    for b in blocks:
        experts = model.get_submodule(b.experts)
        shapes[b.key] = {n: list(p.shape) for n, p in experts.named_parameters(recurse=False)}
    return shapes


def _settings_hash(settings: ReapSettings) -> str:
    # Everything that changes the statistics; not the plan (ratio, criterion) nor the resume flags.
    keys = (
        "model_path",
        "scoring_mode",
        "calibration",
        "max_samples",
        "max_seq_len",
        "batch_size",
        "image_share",
        "min_pixels",
        "max_pixels",
        "shuffle",
        "packing",
        "chat_template",
        "eval_data",
        "seed",
        "dtype",
    )
    values = {k: str(getattr(settings, k)) for k in keys}
    values["batching"] = BATCHING  # a checkpoint of other batches would resume at another sample
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def _save_checkpoint(path: Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def encode(label: str, samples, processor, **kwargs) -> list:
    """make_batches with a progress bar over the samples."""
    samples = list(samples)
    with console.progress(label, len(samples), "samples") as bar:
        return list(make_batches(samples, processor, on_sample=bar.advance, **kwargs))


def _is_user_file(spec: str) -> bool:
    path = Path(spec)
    return spec.startswith("folder:") or path.suffix == ".jsonl" or path.is_file() or path.is_dir()


def plan_heldout(settings: ReapSettings) -> list:
    """The held-out samples the candidate plans are measured on: REAP_EVAL_DATA (a JSONL file or folder: every
    row; a built-in set or mix: its plan-selection slice), else REAP_CALIBRATION's plan-selection slice."""
    from .candidates import heldout_samples

    if not settings.eval_data:
        return heldout_samples(settings)
    spec = settings.eval_data
    if not _is_user_file(spec):  # a built-in set or mix: its plan-selection slice, as for REAP_CALIBRATION
        return heldout_samples(dataclasses.replace(settings, calibration=spec))
    return load_samples(spec, "all", max_samples=settings.eval_samples, seed=settings.seed, shuffle=settings.shuffle)


def data_split(settings: ReapSettings, samples, held) -> dict:
    """Per source: how many samples calibration scores and how many measure the plans, and by which rule."""
    names = [name for name, _ in parse_spec(settings.calibration)]
    out: dict[str, dict] = {}
    for role, group in (("calibration", samples), ("heldout", held)):
        for s in group:
            entry = out.setdefault(s.source, {"calibration": 0, "heldout": 0})
            entry[role] += 1
    for source, entry in out.items():
        if settings.eval_data and entry["calibration"] == 0:
            entry["rule"] = f"held-out data from REAP_EVAL_DATA={settings.eval_data}"
        elif source in BUILTIN:
            entry["rule"] = (
                "built-in set: its calibration file; the plans measured on the selection portion of its evaluation "
                "file (the test stage evaluates on the rest)"
            )
        elif settings.eval_data:
            entry["rule"] = "every row scored (the held-out data is REAP_EVAL_DATA)"
        else:
            entry["rule"] = (
                "content hash: 1 row in 5 held out (disjoint from calibration, stable), the plans measured on "
                f"its selection portion ({SELECTION_SHARE:.0%}); REAP_EVAL_DATA=FILE measures on other data and "
                "scores every row"
            )
    for name in (n for n in names if n != "combined"):  # a source that contributed nothing is worth saying
        out.setdefault(name, {"calibration": 0, "heldout": 0, "rule": "no samples"})
    return out


def _print_split(split: dict, settings: ReapSettings) -> None:
    width = max(len(name) for name in split)
    console.info(
        f"data split (calibration | held-out for the candidate plans; chat template: {settings.chat_template}):"
    )
    for name, e in split.items():
        console.info(f"  {name:{width}s}  {e['calibration']:5d} | {e['heldout']:<5d} {e['rule']}")


def _print_budget(budget: dict) -> None:
    from rich.table import Table

    table = Table(title="calibration tokens (padding excluded)")
    for col in ("source", "samples", "text tokens", "image tokens"):
        table.add_column(col, justify="right" if col != "source" else "left")
    for name, e in sorted(budget["sources"].items()):
        table.add_row(name, str(e["samples"]), str(e["text"]), str(e["image"]))
    t = budget["total"]
    table.add_row("total", str(t["samples"]), str(t["text"]), str(t["image"]), style="bold")
    console.table(table)


def _print_plan(meta: dict) -> None:
    from rich.table import Table

    crit = meta["plan"]["criterion"]
    plan = meta["plan"]
    how = f"merge ({plan['merge']['grouping']}) of {crit}" if plan.get("method") == "merge" else crit
    table = Table(title=f"keep plan: {how}, ratio {plan['ratio']}, modality {plan['modality']}")
    for col in ("block", "experts", "kept", "removed", "score min / median / max (kept)", "protected"):
        table.add_column(col)
    import numpy as np

    for block in meta["model"]["blocks"]:
        layer = meta["layers"][block["key"]]
        scores = np.array([np.nan if v is None else v for v in (layer["scores"].get(crit) or [])], dtype=float)
        kept = layer["kept"]
        spread = ""
        if scores.size:
            ks = scores[kept]
            ks = ks[np.isfinite(ks)]
            spread = f"{ks.min():.3g} / {np.median(ks):.3g} / {ks.max():.3g}" if ks.size else "-"
        table.add_row(
            block["key"],
            str(block["num_experts"]),
            str(len(kept)),
            str(block["num_experts"] - len(kept)),
            spread,
            str(len(layer.get("protected", {}))),
        )
    console.table(table)


def merge_collector(settings: ReapSettings, model, blocks, num_batches: int):
    """The merge statistics' accumulators (full mode, REAP_MERGE_STATS_MB > 0), or None."""
    if settings.scoring_mode != "full" or not settings.merge_stats_mb:
        return None
    from .moe import expert_weights
    from .observe import merge_stats

    sizes = []
    for b in blocks:
        w = expert_weights(model.get_submodule(b.experts))
        sizes.append((b.num_experts, w.up.shape[1], w.up.shape[2], b.router_rows or b.num_experts))
    samples = merge_stats.sample_budget(sizes, settings.merge_stats_mb)
    per_batch = -(-samples // max(num_batches, 1))
    return merge_stats.MergeStats(blocks, samples, per_batch, settings.seed)


def accumulate(
    settings: ReapSettings,
    model,
    blocks,
    batches,
    out_dir: Path,
    on_batch: Callable[[int], None] | None = None,
    merge=None,
) -> tuple[dict, bool, float]:
    """Run the calibration batches through the model with the observer. Returns (stats, resumed, seconds)."""
    checkpoint = out_dir / distributed.checkpoint_name(CHECKPOINT_NAME)
    observer = Observer(model, blocks, settings.scoring_mode, settings.chunk_memory_mb, merge=merge)
    start_batch, resumed = 0, False
    fingerprint = _settings_hash(settings)
    started = time.perf_counter()
    with observer, torch.inference_mode():
        if settings.resume and checkpoint.exists():
            saved = read_accumulators(checkpoint, observer.state(), len(batches), SettingsError)
            if saved["settings_hash"] != fingerprint:
                raise SettingsError(
                    f"the accumulator checkpoint {checkpoint} was made with other settings",
                    "resuming would mix statistics of different runs",
                    "Run without --resume (the checkpoint is then replaced)",
                )
            try:
                observer.load(saved["state"])
            except (KeyError, TypeError, ValueError, RuntimeError) as err:
                raise SettingsError(
                    f"the accumulator checkpoint {checkpoint} does not fit this run",
                    f"{type(err).__name__}: {err}"[:200],
                    f"Delete {checkpoint} and run again, or run without --resume",
                ) from None
            start_batch, resumed = saved["batch"], True
            console.info(f"resuming after batch {start_batch} of {len(batches)} from {checkpoint}")
        tokens_done = 0
        device = input_device(model)
        with console.progress("scoring", len(batches), "batches", tps=0.0) as bar:
            bar.update(completed=start_batch)
            for i in range(start_batch, len(batches)):
                batch = batches[i]
                observer.set_modality(batch.modality)
                forward(model, batch, device)
                tokens_done += int((batch.modality >= 0).sum())
                elapsed = max(time.perf_counter() - started, 1e-9)
                bar.advance(tps=tokens_done / elapsed)
                if settings.checkpoint_every and (i + 1) % settings.checkpoint_every == 0 and i + 1 < len(batches):
                    _save_checkpoint(
                        checkpoint, {"batch": i + 1, "state": observer.state(), "settings_hash": fingerprint}
                    )
                if on_batch is not None:
                    on_batch(i + 1)
    return observer.export(), resumed, time.perf_counter() - started


def merge_features_bytes(model, block) -> int:
    """The float32 alignment features merge._features fills for a block: [E, I, gate + up + down widths]."""
    from .moe import expert_weights

    w = expert_weights(model.get_submodule(block.experts))
    width = sum(t.shape[2] for t in (w.gate, w.up) if t is not None) + w.down.shape[1]
    return w.up.shape[0] * w.up.shape[1] * width * 4


def accumulate_streamed(settings: ReapSettings, streamed, blocks, batches, merge=None, eval_batches=None) -> tuple:
    """The calibration statistics with one decoder layer resident at a time (reap_vlm.execution.stream),
    and with `eval_batches` every candidate plan measured in the same pass (choose_plan then reads it).
    Returns (stats, resumed, seconds, merge statistics or None)."""
    from .execution.plans import LayerCuts, MergeCut
    from .execution.stream import MergeSpace, PlanSpace, score_pass
    from .observe import merge_stats

    started = time.perf_counter()
    with console.progress("scoring", len(streamed.layers), "layers", tps=0.0) as bar:
        tokens = sum(int((b.modality >= 0).sum()) for b in batches)

        def on_layer(done: int, total: int) -> None:
            bar.update(completed=done, tps=tokens * done / max(time.perf_counter() - started, 1e-9))

        plans = merging = None
        # data parallel: each rank measures its shard of the held-out batches, every layer's plans cut from the
        # statistics of all ranks; with fewer held-out batches than ranks the plans get their own pass instead
        if eval_batches and len(eval_batches) >= distributed.world():
            cuts = LayerCuts(settings, blocks)
            plans = PlanSpace(distributed.shard(eval_batches), cuts.count, distributed.on_reduced(cuts))
            if merge is not None and settings.eval_merge:  # the merge candidate too, from every rank's statistics
                made = MergeCut(settings, blocks)

                def cut(stats: dict, tensors: dict, samples=merge.samples):
                    if distributed.active():
                        stats = distributed.reduce_stats(stats)
                        flat = {f"{key}.{name}": t for key, named in tensors.items() for name, t in named.items()}
                        tensors = merge_stats.by_block(distributed.reduce_merged_tensors(flat, samples))
                    return made(stats, tensors)

                merging = MergeSpace(cut, made.key, made.router)
                streamed.merge_features = max(merge_features_bytes(streamed.model, b) for b in blocks)
        stats, merged, _ = score_pass(
            streamed,
            blocks,
            batches,
            settings.scoring_mode,
            settings.chunk_memory_mb,
            on_layer,
            merge,
            settings.seed,
            plans,
            merging,
        )
    return stats, False, time.perf_counter() - started, merged


def choose_plan(
    settings: ReapSettings,
    model,
    blocks,
    meta: dict,
    eval_batches: list | None,
    search_batches: list | None = None,
    merge_stats: dict | None = None,
) -> None:
    """Fill meta['plan'], meta['candidates'] and every layer's kept / protected."""
    blocks_meta = meta["model"]["blocks"]
    mode = settings.scoring_mode
    criterion, chosen_by = settings.criterion, "fixed by REAP_CRITERION"
    if criterion != "auto" and criterion not in scoring.available_criteria(mode):
        raise SettingsError(
            f"criterion {criterion} needs expert outputs, which {mode} mode does not record",
            "",
            "Use REAP_SCORING_MODE=full or routed, or a routing criterion (frequency, weighted_frequency)",
        )
    policy, kept, method, merge = settings.modality, None, "prune", None
    if eval_batches:
        from .candidates import measure_and_choose

        console.step("measuring the candidate plans")
        chosen, table = measure_and_choose(model, blocks, meta, eval_batches, settings, search_batches, merge_stats)
        meta["candidates"] = table
        if chosen:
            criterion, policy, chosen_by, kept = chosen["criterion"], chosen["policy"], chosen["reason"], chosen["kept"]
            method, merge = chosen["method"], chosen.get("merge")
        else:
            criterion = ("weighted_frequency" if mode == "router" else "reap") if criterion == "auto" else criterion
            chosen_by = "held-out slice has no targets; " + (
                "default criterion" if settings.criterion == "auto" else "fixed criterion"
            )
        if distributed.is_writer():
            _print_candidates(table)
    elif criterion == "auto":
        criterion = "weighted_frequency" if mode == "router" else "reap"
        chosen_by = "default for this mode (plan measurement off: REAP_EVAL_SAMPLES=0)"
    # the searches start from REAP_MODALITY's ranking
    modality = settings.modality if policy in ("greedy", "swap") else policy
    ratio = None if settings.num_keep else settings.prune_ratio
    plans = scoring.plan(
        meta["layers"],
        blocks_meta,
        criterion=criterion,
        ratio=ratio,
        num_keep=settings.num_keep,
        modality=modality,
        round_to=settings.round_to,
        protect_super=settings.protect_super_experts,
        super_factor=settings.super_expert_factor,
    )
    if kept is not None:  # the measured plan (the searches', or a merge plan's centroids, differ from a ranking's)
        plans = {
            key: {"kept": kept[key], "protected": {j: r for j, r in p["protected"].items() if int(j) in kept[key]}}
            for key, p in plans.items()
        }
    for key, p in plans.items():
        meta["layers"][key].update(p)
    meta["plan"] = {
        "method": method,  # what the prune stage does by default (prune_model.py --method auto)
        **({"merge": merge} if merge else {}),
        "criterion": criterion,
        "ratio": ratio,
        "num_keep": settings.num_keep or None,
        "kept_per_block": {k: len(p["kept"]) for k, p in plans.items()},
        "modality": modality,
        "policy": policy,
        "modality_weights": {
            b["key"]: scoring.modality_weights(meta["layers"][b["key"]]["stats"], modality) for b in blocks_meta
        },
        "round_to": settings.round_to,
        "protect_super_experts": settings.protect_super_experts,
        "super_expert_factor": settings.super_expert_factor,
        "chosen_by": chosen_by,
    }


def _print_candidates(table: dict) -> None:
    """The measured plans at the requested ratio: objective, KL per modality, the floor, the choice."""
    from rich.table import Table

    from .candidates import _label

    chosen = table.get("chosen") or {}
    rows = [
        r
        for r in table["rows"]
        if r["ratio"] == chosen.get("ratio", table["rows"][0]["ratio"] if table["rows"] else None)
    ]
    if not rows:
        return
    out = Table(title=f"candidate plans at ratio {rows[0]['ratio']} (objective: {table['objective'].split(':')[0]})")
    for col in ("plan", "objective", "text", "image", "loss", "floor", ""):
        out.add_column(col)

    def fmt(v):
        return "-" if v is None else f"{v:.4f}"

    by_plan: dict[int, list[dict]] = {}
    for r in rows:
        by_plan.setdefault(r["plan_id"], []).append(r)
    for same in sorted(by_plan.values(), key=lambda g: (g[0]["objective"] is None, g[0]["objective"] or 0.0)):
        r, labels = same[0], [_label(x) for x in same]
        floor = r.get("floor")
        floor_text = "-" if floor is None or not floor["checked"] else ("ok" if floor["ok"] else "below random")
        out.add_row(
            labels[0] + (f" (= {len(labels) - 1} more)" if len(labels) > 1 else ""),
            fmt(r["objective"]),
            fmt(r["by_modality"].get("text", {}).get("objective")),
            fmt(r["by_modality"].get("image", {}).get("objective")),
            fmt(r["loss"]),
            floor_text,
            "chosen" if chosen.get("label") in labels else "",
        )
    console.table(out, width=110)
    if chosen:
        console.info(f"plan: {chosen['reason']}")


OUTPUT_FILES = (
    "reap_settings.json",
    RECIPE_NAME,
    "reap_merge_stats.safetensors",
    "reap_heatmap.png",
    "reap_modality.png",
    "reap_candidates.png",
)


def score(settings: ReapSettings, on_batch: Callable[[int], None] | None = None) -> dict:
    """The whole stage, holding the metadata path's lock; returns the metadata it wrote. In a data-parallel
    job (reap_vlm.distributed) every rank runs this; rank 0 holds the lock and writes."""
    with distributed.joined(settings) as settings:
        if settings.model_path is not None:
            read_config(settings.model_path)  # a missing or broken model is the first thing to say
        meta_path = _check_paths(settings)
        writer = distributed.is_writer()
        if not writer:  # the other ranks of a data-parallel job: rank 0 shows the progress and prints the result
            console.configure("quiet", False)
        # makes the folder, and removes it again if the run leaves it empty
        with outputs.locked(meta_path) if writer else contextlib.nullcontext():
            if writer:
                outputs.StagedFiles(meta_path.parent).leftovers([meta_path.name, *OUTPUT_FILES])
            distributed.barrier()  # the folder is rank 0's before any rank checkpoints into it
            meta = _score(settings, meta_path, on_batch)
            distributed.barrier()  # every rank removed its checkpoint before the lock goes
            return meta


def _quantization(model_dir: Path, config: dict, model) -> dict | None:
    """What the metadata records about a quantized input: its format (reap_vlm.quantization) and the
    precision the statistics were computed in (the dequantized weights, in the model's dtype)."""
    from .loading import quantization_of

    quant = quantization_of(model_dir, config)
    if quant is None:
        return None
    from .quantization import FP8_DEQUANTIZED_IMPL, is_fp8_experts, is_quantized_experts

    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    source = f"the dequantized weights in {dtype}"
    kept = [m for m in model.modules() if is_fp8_experts(m)]
    packed = [m for m in model.modules() if is_quantized_experts(m) and not is_fp8_experts(m)]
    if kept:  # the routed experts stayed e4m3 in memory (quantization.keep_fp8_experts)
        impl = kept[0].config._experts_implementation
        forward = "dequantized" if impl == FP8_DEQUANTIZED_IMPL else f"transformers' FP8 kernels ({impl})"
        source += f"; the experts kept in FP8, dequantized chunk by chunk; the experts' forward {forward}"
    elif packed:  # kept as stored (quantization.PackedExperts)
        source += f"; the experts kept as stored ({quant.format}), dequantized chunk by chunk, also in their forward"
    return {**quant.summary(), "statistics_from": source}


def _load(settings: ReapSettings, execution, config: dict, meta_path: Path) -> tuple:
    """(model, processor, StreamedModel or None) for the execution mode."""
    if execution.mode == "stream":
        from .execution.stream import StreamedModel, check_settings

        check_settings(settings, config)  # refuse before anything is loaded
        streamed = StreamedModel(
            settings.model_path,
            device=settings.device,
            dtype=settings.dtype,
            attn_implementation=settings.attn_implementation,
            trust_remote_code=settings.trust_remote_code,
            cache_bytes=int(settings.stream_cache_gb * 2**30),
            spill_parent=meta_path.parent,
            chunk_bytes=settings.chunk_memory_mb * 2**20,
        )
        return streamed.model, streamed.processor, streamed
    console.step(f"loading {settings.model_path}")
    model, processor, _ = load_model(
        settings.model_path,
        device=settings.device,
        dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code,
        attn_implementation=settings.attn_implementation,
    )
    group_vision_attention(model)  # Qwen3-VL with SDPA: one attention call per image size, not per image
    return model, processor, None


def _score(settings: ReapSettings, meta_path: Path, on_batch: Callable[[int], None] | None) -> dict:
    config = read_config(settings.model_path)
    execution = choose_execution(settings)
    phases = Phases(settings.device, echo=distributed.is_writer())
    if distributed.is_writer():
        console.info(f"execution: {execution.mode} ({execution.reason})")
        if note := distributed.hint(settings, execution):
            console.info(note)
    with phases("load"):
        model, processor, streamed = _load(settings, execution, config, meta_path)
    blocks = find_moe_blocks(model)
    ratio = None if settings.num_keep else settings.prune_ratio
    for b in blocks:  # fail before the expensive part
        scoring.n_keep_for(
            b.num_experts,
            ratio=ratio,
            num_keep=settings.num_keep,
            top_k=b.top_k,
            round_to=settings.round_to,
            n_group=b.n_group,
        )

    with phases("data") as data_phase:  # reading the samples, the processor, collation
        samples, held, batches, eval_batches, search_batches = _data(settings, processor)
        if streamed is None:  # M-RoPE and vision tower inputs on the host, pinned, once instead of in every forward
            prepare_batches(model, [*batches, *(eval_batches or []), *(search_batches or [])])
        budget = token_budget(batches)
        data_phase["tokens"] = budget["total"]["text"] + budget["total"]["image"]
    split = data_split(settings, samples, held)
    if distributed.is_writer():
        _print_budget(budget)
        _print_split(split, settings)

    out_dir = meta_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    merge = merge_collector(settings, model, blocks, len(batches))
    # data parallel: batch i is rank i mod N's (else all are this process'); the phase ends with the reduction,
    # when the slowest rank is done, so its tokens/s are the job's
    mine = distributed.shard(batches, "calibration batches")
    with phases("scoring", tokens=budget["total"]["text"] + budget["total"]["image"]):
        if streamed is not None:
            stats, resumed, seconds, merge = accumulate_streamed(settings, streamed, blocks, mine, merge, eval_batches)
        else:
            stats, resumed, seconds = accumulate(settings, model, blocks, mine, out_dir, on_batch, merge)
        stats, merge = distributed.reduce_stats(stats), distributed.reduce_merge(merge, len(batches))
        resumed, seconds = distributed.any_rank(resumed), distributed.max_over_ranks(seconds)

    console.step("computing the scores")
    fingerprint = metadata.model_fingerprint(config, blocks, _expert_shapes(model, blocks), str(settings.model_path))
    fingerprint["quantization"] = _quantization(settings.model_path, config, model)
    score_fn = sorted({b.score_fn for b in blocks})
    meta = metadata.new(
        model=fingerprint,
        scoring={
            "mode": settings.scoring_mode,
            "gate": GATE_DEFINITION.format(fn="/".join(score_fn)),
            "resumed": resumed,
            "seconds": round(seconds, 3),
            "batches": len(batches),
            "execution": {"mode": execution.mode, "reason": execution.reason},
            "ranks": distributed.world(),
        },
        calibration={
            "spec": settings.calibration,
            "samples": len(samples),
            "seed": settings.seed,
            "max_seq_len": settings.max_seq_len,
            "batch_size": settings.batch_size,
            "image_share": settings.image_share,
            "packing": settings.packing,
            "skipped_images": samples.skipped,
            "tokens": {"text": budget["total"]["text"], "image": budget["total"]["image"]},
            "sources": budget["sources"],
            "chat_template": settings.chat_template,
            "eval_data": settings.eval_data or None,
            "split": split,
        },
        settings=settings.to_dict(),
    )
    for b in blocks:
        meta["layers"][b.key] = {
            "stats": stats[b.key],
            "scores": scoring.all_scores(stats[b.key], settings.scoring_mode),
        }
    plan_tokens = sum(int((b.modality >= 0).sum()) for b in (eval_batches or []))
    with phases("plans", tokens=plan_tokens or None):  # the merge statistics' summary first (GPU work)
        stats_by_block = info = None
        if merge is not None:
            from .observe import merge_stats

            stats_by_block = merge_stats.by_block(merge.tensors())
            info = {
                "config_sha256": fingerprint["config_sha256"],
                "created": meta["created"],
                "samples_per_block": merge.samples,
            }
            meta["merge_stats"] = {"file": merge_stats.FILE_NAME, **info}
        _plans(settings, model, streamed, blocks, meta, eval_batches, search_batches, stats_by_block)
    meta["scoring"]["phases"] = phases.summary()  # the write phase is printed, not recorded
    if not distributed.is_writer():  # the other ranks of a data-parallel job: the same metadata, not written
        (out_dir / distributed.checkpoint_name(CHECKPOINT_NAME)).unlink(missing_ok=True)
        return meta
    with phases("write"):
        written = _write(settings, meta, meta_path, merge, info, stats, blocks)
    (out_dir / distributed.checkpoint_name(CHECKPOINT_NAME)).unlink(missing_ok=True)
    _print_plan(meta)
    print_summary(phases.summary())
    console.info(f"metadata written to {meta_path}")
    console.set_result(
        {
            "metadata": str(meta_path),
            "files": sorted(str(out_dir / name) for name in written),
            "plan": {
                k: meta["plan"][k] for k in ("method", "criterion", "modality", "policy", "ratio", "kept_per_block")
            },
            "chosen_by": meta["plan"]["chosen_by"],
            "calibration": {"samples": len(samples), **meta["calibration"]["tokens"]},
            "scoring_seconds": meta["scoring"]["seconds"],
        }
    )
    return meta


def _plans(settings, model, streamed, blocks, meta, eval_batches, search_batches, stats_by_block) -> None:
    if streamed is not None:
        # the plans were measured in the statistics' pass (candidates._run_plans asks StreamedModel.run_plans),
        # the merge candidate too (its merged experts made from each resident layer, execution.plans.MergeCut)
        if stats_by_block is not None and eval_batches and settings.eval_merge and streamed.measured is None:
            # data parallel with fewer held-out batches than ranks: the plans get their own passes, without it
            console.info("note: streamed execution measures the merge candidate only in the statistics' pass")
            stats_by_block = None
        if search_batches and settings.criterion == "auto":
            note = _greedy_passes_note(settings, meta)
            if note:
                console.info(f"note: streamed execution: {note}")
                meta["scoring"]["execution"]["notes"] = [note]
        choose_plan(settings, streamed, blocks, meta, eval_batches, search_batches, stats_by_block)
        meta["scoring"]["execution"]["passes"] = 1 + streamed.extra_passes
        meta["scoring"]["execution"]["seconds"] = {k: round(v, 3) for k, v in streamed.timings.items()}
        meta["scoring"]["execution"]["memory"] = streamed.memory_report()
        streamed.close()
    else:
        from .quantization import is_quantized_experts

        if stats_by_block is not None and any(is_quantized_experts(model.get_submodule(b.experts)) for b in blocks):
            # merged experts would be written into the model's weights, which are quantized here
            if eval_batches and settings.eval_merge:
                console.info(
                    "note: the routed experts are kept quantized in memory, so merge candidates are not measured "
                    "(the prune candidates are)"
                )
            stats_by_block = None
        choose_plan(settings, model, blocks, meta, eval_batches, search_batches, stats_by_block)


def _greedy_passes_note(settings, meta: dict) -> str | None:
    """What the searches cost in streamed execution: their steps depend on each other (each step's trial
    plans are built from the previous step's result), so each greedy step is one more pass over the weights
    (more where its trial streams do not fit the hidden-state cache), each swap-search measurement too, and
    their plans one more on the held-out batches. None where the greedy search will not run
    (candidates.greedy_steps says why in the table's notes)."""
    from .candidates import greedy_steps

    try:
        steps = greedy_steps(
            meta["model"]["blocks"],
            None if settings.num_keep else settings.prune_ratio,
            settings.num_keep,
            settings.round_to,
        )
    except PlanError:
        return None
    note = (
        f"the greedy search takes {steps} step(s), each one more pass over the weights (REAP_GREEDY_SEARCH=false "
        "skips it)"
    )
    if settings.search_budget:  # candidates.swap_search: a screening and an exact measurement per block step
        note += (
            f"; the swap search after it spends at most REAP_SEARCH_BUDGET={settings.search_budget} evaluations, "
            "each measurement of its one more pass (two per block step; REAP_SEARCH_BUDGET=0 skips it)"
        )
    return note + "; one more pass measures the searches' plans on the held-out batches"


def _write(settings, meta: dict, meta_path: Path, merge, info: dict | None, stats: dict, blocks) -> list[str]:
    """Every file appears together at the end, or none does: staged beside its final name, renamed last.
    Returns the names written."""
    console.step("writing the metadata")
    with outputs.staged(meta_path.parent) as files:
        metadata.write(files.path(meta_path.name), meta)
        if merge is not None:
            from .observe import merge_stats

            merge_stats.write(files.path(merge_stats.FILE_NAME), merge, info)
        dump(settings, files.path("reap_settings.json"))
        files.path(RECIPE_NAME).write_text(
            recipe_text(
                recipe_values(settings),
                "The reap stage's resolved settings (the keys of .env): run it again with --config reap_recipe.yaml",
            )
        )
        if settings.plots:
            from .report import candidates_png, heatmap_png, modality_png

            console.step("drawing the saliency heatmap")
            heatmap_png(meta, files.path("reap_heatmap.png"), meta["plan"]["criterion"])
            if any(stats[b.key]["image"]["tokens"] for b in blocks):
                console.step("drawing the image-vs-text view")
                modality_png(meta, files.path("reap_modality.png"))
            if meta.get("candidates", {}).get("rows"):
                console.step("drawing the candidate-plan chart")
                candidates_png(meta["candidates"], files.path("reap_candidates.png"))
    return list(files.names)


def _data(settings: ReapSettings, processor) -> tuple:
    """(calibration samples, held-out samples, their batches, held-out batches or None, greedy-search batches or
    None: none when REAP_GREEDY_SEARCH is off)."""
    samples = load_samples(
        settings.calibration,
        "all" if settings.eval_data else "calibration",  # held-out data from elsewhere: user files are scored whole
        max_samples=settings.max_samples,
        seed=settings.seed,
        image_share=settings.image_share,
        shuffle=settings.shuffle,
    )
    batch_args = dict(
        max_seq_len=settings.max_seq_len,
        batch_size=settings.batch_size,
        min_pixels=settings.min_pixels,
        max_pixels=settings.max_pixels,
        chat_template=settings.chat_template,
    )
    batches = encode("encoding calibration", samples, processor, packing=settings.packing, bucket=True, **batch_args)
    eval_batches = search_batches = None
    held: list = []
    if settings.eval_samples > 0:
        from .candidates import search_samples

        held = plan_heldout(settings)
        eval_batches = encode("encoding held-out", held, processor, answers=True, **batch_args)
    if settings.eval_samples > 0 and settings.greedy_search:
        search_batches = encode("encoding search", search_samples(settings), processor, answers=True, **batch_args)
    return samples, held, batches, eval_batches, search_batches


def run(settings: ReapSettings) -> int:
    score(settings)
    return 0
