"""The test stage: structural check, generation + degeneration, agreement / KL / perplexity against the
original on held-out data, expert usage, a report and a pass/fail verdict (exit 0 / 1)."""

from __future__ import annotations

import gc
import json
import math
import shutil
import tempfile
from pathlib import Path

import torch

from . import console, metadata, outputs
from .calibration import load_samples, make_batches, read_source
from .candidates import _token_metrics
from .checkpoint import inspect_checkpoint
from .degeneration import analyse
from .errors import EXIT_FAILED, CheckpointError, InputNotFoundError
from .loading import input_device, is_vision_language, load_model, read_config
from .moe import find_moe_blocks
from .observe.usage import ExpertUsage, usage_entropy
from .settings import TestSettings, dump

PROMPT_CHARS = 400
ANSWER_MARGIN = 4  # generated tokens beyond a reference answer's own (its end-of-turn and a few more)
EXAMPLES = 3  # example images in the report


def structural_check(pruned: Path, meta_path: Path) -> dict:
    """Config counts vs tensor shapes, index completeness, reap_pruning vs metadata, processor files."""
    if not pruned.exists():
        raise InputNotFoundError(
            f"pruned model {pruned} does not exist", "", "Run ./run.sh prune first, or pass --pruned-model-path"
        )
    layout = inspect_checkpoint(pruned)  # raises on count/shape/index mismatches
    info = layout.config.get("reap_pruning")
    checks = {"moe_blocks": len(layout.blocks), "num_experts": layout.num_experts, "index_complete": True}
    if info and meta_path.is_file():
        meta = metadata.read(meta_path)
        if info.get("source", {}).get("config_sha256") != meta["model"]["config_sha256"]:
            checks["metadata_note"] = "the metadata was made for another source checkpoint than this pruned model's"
        else:
            kept = {b["key"]: meta["layers"][b["key"]].get("kept") for b in meta["model"]["blocks"]}
            same = all(kept.get(k) == v for k, v in info["kept"].items())
            if same:
                checks["plan_matches_metadata"] = True
            elif info.get("method") == "merge":  # the kept lists are the merge groups' centroids
                checks["plan_matches_metadata"] = "merged: the groups' centroids are not the metadata's kept experts"
            else:
                checks["plan_matches_metadata"] = "re-cut: not the metadata's plan (another criterion, policy or ratio)"
    for key, kept in (info or {}).get("kept", {}).items():
        if len(kept) != layout.num_experts:
            raise CheckpointError(
                f"reap_pruning lists {len(kept)} kept experts for {key} but config.json says {layout.num_experts}",
                "",
                "Re-run ./run.sh prune",
            )
    names = {p.name for p in pruned.iterdir()}
    checks["processor_files"] = sorted(
        names
        & {
            "tokenizer.json",
            "tokenizer_config.json",
            "processor_config.json",
            "preprocessor_config.json",
            "chat_template.jinja",
            "chat_template.json",
        }
    )
    if not {"tokenizer.json", "tokenizer_config.json"} & names:
        raise CheckpointError(
            f"{pruned} has no tokenizer files",
            "the pruned model cannot be used without them",
            "Re-run ./run.sh prune (it copies every non-weight file)",
        )
    return checks


def heldout(settings: TestSettings):
    """The held-out samples: 'builtin' = the test portion of the `combined` set's evaluation split; one JSONL
    file = every row of it; anything else is a calibration spec (a built-in set or a mix such as
    'tasks:35,code:5') read from the test portion of its evaluation split.

    The evaluation split's other portion (`selection`, calibration.heldout_portions) is where the reap stage
    measures candidate plans and chooses one, so a plan is never judged here on the data that chose it."""
    spec = "combined" if settings.eval_data == "builtin" else settings.eval_data
    path = Path(spec)
    if path.suffix == ".jsonl" or path.is_file():  # a user file: every row is held out
        return list(read_source(spec, "calibration")) + list(read_source(spec, "evaluation"))
    return load_samples(
        spec, "test", max_samples=settings.eval_samples, seed=settings.seed, image_share=settings.image_share
    )


def _prompt_messages(sample) -> list[dict]:
    if sample.kind == "image" or sample.answer.strip():
        return sample.messages
    return [
        {"role": "user", "content": [{"type": "text", "text": "Continue this text:\n\n" + sample.text[:PROMPT_CHARS]}]}
    ]


def normalise(text: str) -> str:
    """The form answers are compared in: surrounding and repeated whitespace removed, case folded."""
    return " ".join(text.split()).casefold()


def task_of(sample) -> str:
    """The task a reference answer belongs to: the row's `task`, else its source."""
    return sample.task or sample.source


def name_tasks(samples) -> dict[str, str]:
    """Sample id -> task name for the report: the task alone, or 'source/task' where two sources share a
    task name (their questions are different data)."""
    sources: dict[str, set[str]] = {}
    for s in samples:
        if s.answer.strip():
            sources.setdefault(task_of(s), set()).add(s.source)
    return {
        s.id: (task_of(s) if len(sources[task_of(s)]) == 1 else f"{s.source}/{task_of(s)}")
        for s in samples
        if s.answer.strip()
    }


def _stop_ids(model, tok) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return ids | ({tok.eos_token_id} if tok.eos_token_id is not None else set())


def _left_padded(processor, texts: list[str], images: list) -> dict:
    """One generation batch, left-padded (new tokens then start at the same column for every row)."""
    tok = getattr(processor, "tokenizer", processor)
    side = tok.padding_side
    tok.padding_side = "left"
    try:
        if images:  # the checkpoint's own image-processor limits
            return dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
        return dict(tok(texts, padding=True, return_tensors="pt"))
    finally:
        tok.padding_side = side


def _generate_group(model, processor, samples, group: list[int], budgets, stop, device, new_ids: dict) -> None:
    """Greedy generation for one batch of prompts; each row's new tokens into new_ids."""
    tok = getattr(processor, "tokenizer", processor)
    texts = [
        processor.apply_chat_template(_prompt_messages(samples[i]), tokenize=False, add_generation_prompt=True)
        for i in group
    ]
    images = [img for i in group for img in samples[i].images]
    inputs = {k: v.to(device) for k, v in _left_padded(processor, texts, images).items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        ids = model.generate(
            **inputs,
            max_new_tokens=max(budgets[i] for i in group),
            do_sample=False,
            pad_token_id=tok.pad_token_id,
        )[:, inputs["input_ids"].shape[1] :]
    for row, i in enumerate(group):
        new = ids[row, : budgets[i]].tolist()
        end = next((k for k, t in enumerate(new) if t in stop), None)
        new_ids[i] = new if end is None else new[: end + 1]


def generate(
    model,
    processor,
    samples,
    max_new_tokens: int,
    settings: TestSettings,
    label: str = "generating",
    tasks: dict | None = None,
) -> list[dict]:
    """Greedy generations, REAP_BATCH_SIZE prompts at a time (left-padded; image and text prompts in
    separate batches). A prompt with a reference answer gets room for the answer's tokens plus
    ANSWER_MARGIN (its end-of-turn and a few more) and is scored by exact match; the others get
    max_new_tokens and are checked for degeneration. Each row is cut at its own budget and after its
    first end-of-sequence token, as if it had been generated alone. `tasks`: name_tasks of the whole held-out
    set, when `samples` are some of it."""
    tok = getattr(processor, "tokenizer", processor)
    device = input_device(model)
    tasks = name_tasks(samples) if tasks is None else tasks
    stop = _stop_ids(model, tok)
    budgets = [
        len(tok(s.answer.strip(), add_special_tokens=False)["input_ids"]) + ANSWER_MARGIN
        if s.answer.strip()
        else max_new_tokens
        for s in samples
    ]
    order = sorted(range(len(samples)), key=lambda i: (bool(samples[i].images), budgets[i]))
    groups, current = [], []
    for i in order:  # consecutive same-kind prompts of similar budget, batch_size at a time
        if current and (
            len(current) == settings.batch_size or bool(samples[current[0]].images) != bool(samples[i].images)
        ):
            groups.append(current)
            current = []
        current.append(i)
    if current:
        groups.append(current)
    new_ids: dict[int, list[int]] = {}
    with console.progress(label, len(samples), "prompts") as bar:
        for group in groups:
            _generate_group(model, processor, samples, group, budgets, stop, device, new_ids)
            bar.advance(len(group))
    out = []
    for i, s in enumerate(samples):
        new = new_ids[i]
        answer = tok.decode(new, skip_special_tokens=True)
        row = {
            "sample": s.id,
            "source": s.source,
            "kind": s.kind,
            "prompt": s.text[:200],
            "answer": answer,
            **analyse(answer, new, max_repeat_ratio=settings.max_repeat_ratio),
        }
        reference = s.answer.strip()
        if reference:
            row.update(task=tasks[s.id], reference=reference, correct=normalise(answer) == normalise(reference))
        out.append(row)
    return out


def encode(samples, processor, settings: TestSettings) -> list:
    """The held-out samples as compare's model inputs: those with a reference answer encoded with it as the
    assistant turn (make_batches(answers=True)), REAP_BATCH_SIZE per batch."""
    with console.progress("encoding held-out", len(samples), "samples") as bar:
        return list(
            make_batches(
                samples,
                processor,
                max_seq_len=settings.max_seq_len,
                batch_size=settings.batch_size,
                answers=True,
                on_sample=bar.advance,
                chat_template=settings.chat_template,
            )
        )


def _sample_rows(batch, m: dict, ref: dict | None, tasks: dict) -> list[dict]:
    """One row per sample: its source, kind and task, the pruned-vs-original sums (`m`) and the original's own
    loss and answers (`ref`; None without the original)."""
    rows = []
    for r, s in enumerate(batch.samples):
        row = {"source": s.source, "kind": s.kind, "task": tasks.get(s.id)}
        row.update({k: float(v[r]) for k, v in m.items()})
        for key in ("nll", "answer_nll", "answer_correct"):
            row[key + "_original"] = float(ref[key][r]) if ref is not None else None
        rows.append(row)
    return rows


def compare(pruned, original, processor, samples, settings: TestSettings, batches: list | None = None) -> dict:
    """Agreement, KL and perplexity per source and modality (text targets), loss / agreement / KL on the
    reference answers' tokens per task, and usage entropy per layer of the pruned model. `batches`: the
    samples as encode() makes them, when the caller evaluates several models on the same samples."""
    batches = encode(samples, processor, settings) if batches is None else batches
    blocks = find_moe_blocks(pruned)
    tasks = name_tasks(samples)
    rows = []
    with (
        ExpertUsage(pruned, blocks) as usage,
        torch.inference_mode(),
        console.progress("comparing with the original", sum(len(b.samples) for b in batches), "samples") as bar,
    ):
        for batch in batches:
            usage.batch(batch.modality)
            inputs = {k: v.to(input_device(pruned)) for k, v in batch.inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(pruned.dtype)
            p_logits = pruned(**inputs, use_cache=False).logits
            modality = batch.modality.to(p_logits.device)
            if original is not None:
                o_inputs = {k: v.to(input_device(original)) for k, v in inputs.items()}
                o_logits = original(**o_inputs, use_cache=False).logits.to(p_logits.device)
                ref = _token_metrics(o_logits, o_logits, inputs["input_ids"], modality, batch.answer_mask)
            else:
                o_logits, ref = p_logits, None
            m = _token_metrics(o_logits, p_logits, inputs["input_ids"], modality, batch.answer_mask)
            rows += _sample_rows(batch, m, ref, tasks)
            bar.advance(len(batch.samples))
        counts = usage.totals()
    return _summarise(rows, counts, original is not None)


def compare_streamed(pruned_dir: Path, original_dir: Path | None, samples, settings: TestSettings) -> tuple[dict, dict]:
    """compare() with both models streamed one decoder layer at a time from their own shards
    (reap_vlm.execution.heldout): the same metrics from the same rows, and what the pass did (pre-layer parts
    run once or not and why, per model the layers, the most resident at once and the tensors read, the memory
    report of streamed execution)."""
    from .candidates import METRICS_CHUNK_BYTES
    from .execution.heldout import compare_pass
    from .execution.stream import StreamedModel

    kwargs = dict(
        device=settings.device,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
        trust_remote_code=settings.trust_remote_code,
        cache_bytes=int(settings.stream_cache_gb * 2**30),
        spill_parent=settings.report_dir.parent,
        chunk_bytes=METRICS_CHUNK_BYTES,
    )
    streamed = []
    try:
        if original_dir:
            console.step(f"reading {original_dir} outside its decoder layers")
            streamed.append(StreamedModel(Path(original_dir), **kwargs))
        original = streamed[0] if streamed else None
        pruned = StreamedModel(pruned_dir, load_outer=False, **kwargs)
        streamed.append(pruned)
        batches = encode(samples, pruned.processor, settings)
        blocks = find_moe_blocks(pruned.model)
        layers = sum(len(m.layers) for m in streamed)
        with console.progress("comparing with the original (streamed)", layers, "layers") as bar:
            out, counts, info = compare_pass(
                pruned, original, batches, blocks, on_layer=lambda _done, _total: bar.advance(1)
            )
    finally:
        for m in streamed:
            m.close()
    tasks = name_tasks(samples)
    rows = [row for batch, (m, ref) in zip(batches, out, strict=True) for row in _sample_rows(batch, m, ref, tasks)]
    return _summarise(rows, counts, original_dir is not None), info


def _summarise(rows: list[dict], counts: dict, with_original: bool) -> dict:
    """The report's metrics from compare's per-sample rows and the pruned model's usage counts."""

    def summary(sel):
        tokens = sum(r["tokens"] for r in sel)
        if not tokens:
            return {"tokens": 0}
        out = {"tokens": int(tokens), "ppl_pruned": math.exp(min(sum(r["nll"] for r in sel) / tokens, 50))}
        if with_original:
            out.update(
                agreement=sum(r["agree"] for r in sel) / tokens,
                kl=sum(r["kl"] for r in sel) / tokens,
                ppl_original=math.exp(min(sum(r["nll_original"] for r in sel) / tokens, 50)),
            )
        return out

    def answers(sel):
        tokens = sum(r["answer_tokens"] for r in sel)
        out = {
            "samples": len(sel),
            "answer_tokens": int(tokens),
            "loss_pruned": sum(r["answer_nll"] for r in sel) / tokens,
            "teacher_forced_accuracy_pruned": sum(r["answer_correct"] for r in sel) / len(sel),
        }
        if with_original:
            out.update(
                loss_original=sum(r["answer_nll_original"] for r in sel) / tokens,
                teacher_forced_accuracy_original=sum(r["answer_correct_original"] for r in sel) / len(sel),
                agreement=sum(r["answer_agree"] for r in sel) / tokens,
                kl=sum(r["answer_kl"] for r in sel) / tokens,
            )
        return out

    answered = [r for r in rows if r["answer_tokens"] > 0]
    entropy = {key: usage_entropy(c) for key, c in counts.items()}
    return {
        "overall": summary(rows),
        "by_source": {s: summary([r for r in rows if r["source"] == s]) for s in sorted({r["source"] for r in rows})},
        "by_modality": {k: summary([r for r in rows if r["kind"] == k]) for k in sorted({r["kind"] for r in rows})},
        "text_by_source": {
            s: summary([r for r in rows if r["source"] == s and r["kind"] == "text"])
            for s in sorted({r["source"] for r in rows if r["kind"] == "text"})
        },
        "answers_by_task": {
            t: answers([r for r in answered if r["task"] == t]) for t in sorted({r["task"] for r in answered})
        },
        "usage_entropy": entropy,
    }


def task_accuracy(generations: list[dict]) -> dict:
    """Exact match of greedy answers (normalised) per task, for the pruned model and the original."""
    out = {}
    for task in sorted({g["task"] for g in generations if "task" in g}):
        sel = [g for g in generations if g.get("task") == task]
        entry = {"samples": len(sel), "correct_pruned": sum(g["correct"] for g in sel)}
        entry["accuracy_pruned"] = entry["correct_pruned"] / len(sel)
        if all("original_correct" in g for g in sel):
            entry["correct_original"] = sum(g["original_correct"] for g in sel)
            entry["accuracy_original"] = entry["correct_original"] / len(sel)
            entry["drop_points"] = 100 * (entry["accuracy_original"] - entry["accuracy_pruned"])
        out[task] = entry
    return out


def verdict(report: dict, settings: TestSettings) -> list[str]:
    failures = []
    metrics = report["metrics"]
    overall = metrics["overall"]
    if report["original"] and overall.get("tokens"):
        if overall["agreement"] < settings.min_agreement:
            failures.append(f"top-1 agreement {overall['agreement']:.3f} < REAP_MIN_AGREEMENT {settings.min_agreement}")
        if overall["kl"] > settings.max_kl:
            failures.append(f"KL(original || pruned) {overall['kl']:.4f} > REAP_MAX_KL {settings.max_kl}")
        ratio = overall["ppl_pruned"] / overall["ppl_original"]
        if ratio > settings.max_ppl_ratio:
            failures.append(f"perplexity ratio {ratio:.3f} > REAP_MAX_PPL_RATIO {settings.max_ppl_ratio}")
        for domain, entry in metrics.get("text_by_source", {}).items():
            if entry.get("tokens") and entry["ppl_pruned"] / entry["ppl_original"] > settings.max_ppl_ratio:
                failures.append(
                    f"text perplexity on {domain} {entry['ppl_original']:.2f} -> {entry['ppl_pruned']:.2f} (ratio "
                    f"{entry['ppl_pruned'] / entry['ppl_original']:.3f}) > REAP_MAX_PPL_RATIO {settings.max_ppl_ratio}"
                )
    gen = report["generation"]
    for task, entry in report.get("tasks", {}).items():
        if entry.get("drop_points") is not None and entry["drop_points"] > settings.max_accuracy_drop:
            failures.append(
                f"{entry['kind']} task {task}: exact-match accuracy {entry['accuracy_original']:.0%} -> "
                f"{entry['accuracy_pruned']:.0%} of {entry['samples']} (-{entry['drop_points']:.0f} points) "
                f"> REAP_MAX_ACCURACY_DROP {settings.max_accuracy_drop:g}"
            )
        # without greedy answers to every question (offloaded generation on a few, or none): teacher-forced
        elif gen.get("scope", "all") != "all" and entry.get("teacher_forced_accuracy_original") is not None:
            before, after = entry["teacher_forced_accuracy_original"], entry["teacher_forced_accuracy_pruned"]
            if 100 * (before - after) > settings.max_accuracy_drop:
                failures.append(
                    f"{entry['kind']} task {task}: teacher-forced exact match {before:.0%} -> {after:.0%} of "
                    f"{entry['samples']} (-{100 * (before - after):.0f} points) > REAP_MAX_ACCURACY_DROP "
                    f"{settings.max_accuracy_drop:g}"
                )
    # With the original present, count what pruning broke: prompts whose pruned answer is degenerate while the
    # original's is not (an original that loops on a prompt says nothing about pruning). Without it: all.
    # Prompts with a reference answer are judged by exact match instead.
    share = (
        gen["newly_degenerate_share"] if gen["newly_degenerate_share"] is not None else gen["pruned_degenerate_share"]
    )
    if share is not None and share > settings.max_degenerate_share:
        what = "became degenerate after pruning" if gen["newly_degenerate_share"] is not None else "are degenerate"
        failures.append(
            f"{share:.0%} of generations {what} (> REAP_MAX_DEGENERATE_SHARE {settings.max_degenerate_share:.0%})"
        )
    return failures


def _fmt(v, spec=".4f"):
    return "-" if v is None else format(v, spec)


def _cell(text: str, width: int = 80) -> str:
    return text[:width].replace("|", "/").replace("\n", " ")


def before_after(report: dict) -> list[tuple[str, str, str, str]]:
    """(what, original, pruned, change) rows: text perplexity per domain, then per task exact-match
    accuracy of greedy answers and loss on the answer tokens."""
    rows = []
    for domain, e in report["metrics"].get("text_by_source", {}).items():
        if e.get("tokens"):
            o, p = e.get("ppl_original"), e["ppl_pruned"]
            rows.append((f"text perplexity: {domain}", _fmt(o, ".2f"), _fmt(p, ".2f"), f"x{p / o:.3f}" if o else "-"))
    for task, e in report.get("tasks", {}).items():
        if "accuracy_pruned" in e:
            o, p = e.get("accuracy_original"), e["accuracy_pruned"]
            rows.append(
                (
                    f"{task}: exact match, {e['samples']} {e['kind']} question{'s' if e['samples'] != 1 else ''}",
                    "-" if o is None else f"{o:.0%}",
                    f"{p:.0%}",
                    "-" if o is None else f"{100 * (p - o):+.0f} points",
                )
            )
        elif "teacher_forced_accuracy_pruned" in e:  # no greedy answers to every question: teacher-forced
            o, p = e.get("teacher_forced_accuracy_original"), e["teacher_forced_accuracy_pruned"]
            rows.append(
                (
                    f"{task}: teacher-forced exact match, {e['samples']} {e['kind']} "
                    f"question{'s' if e['samples'] != 1 else ''}",
                    "-" if o is None else f"{o:.0%}",
                    f"{p:.0%}",
                    "-" if o is None else f"{100 * (p - o):+.0f} points",
                )
            )
        if e.get("answer_tokens"):
            o, p = e.get("loss_original"), e["loss_pruned"]
            rows.append(
                (
                    f"{task}: loss on answer tokens (nats)",
                    _fmt(o, ".3f"),
                    _fmt(p, ".3f"),
                    "-" if o is None else f"{p - o:+.3f}",
                )
            )
    return rows


def _markdown(report: dict, figures: list[str]) -> str:
    lines = [
        f"# REAP-VLM test report: {'PASS' if report['passed'] else 'FAIL'}",
        "",
        f"- pruned model: `{report['pruned']}`",
        f"- original: `{report['original'] or 'not given'}`",
        f"- held-out samples: {report['samples']}"
        + (
            f" ({report['skipped_image_samples']} image samples left out: a text-only model)"
            if report.get("skipped_image_samples")
            else ""
        ),
    ]
    execution = report.get("execution")
    if execution:
        lines.append(f"- execution: {execution['mode']} ({execution['reason']})")
        shared = execution.get("pre_layer_parts")
        if shared:
            lines.append(
                "- pre-layer parts (embeddings, vision tower, final norm, head): "
                + ("run once for both models: " if shared["run_once"] else "each model's own: ")
                + shared["why"]
            )
    if report["generation"].get("note"):
        lines.append(f"- {report['generation']['note']}")
    lines.append("")
    from .report import pruning_md

    lines += pruning_md(report.get("pruning"))
    if report["failures"]:
        lines += ["## Failing checks", ""] + [f"- {f}" for f in report["failures"]] + [""]
    table = before_after(report)
    if table:
        lines += [
            "## Before → after (held-out)",
            "",
            "Text perplexity per domain on held-out text; "
            + (
                "exact match of greedy answers (whitespace and case normalised)"
                if report["generation"].get("scope", "all") == "all"
                else "teacher-forced exact match (every answer token the model's top-1)"
            )
            + " and the loss on the reference answer's tokens per image task.",
            "",
            "| what | original | pruned | change |",
            "|---|---|---|---|",
        ]
        lines += [f"| {' | '.join(row)} |" for row in table]
        lines.append("")
    examples = report.get("examples", [])
    if examples:
        lines += ["## Examples", ""]
        for i, ex in enumerate(examples, 1):
            mark = {True: "right", False: "wrong", None: "-"}
            lines += [
                f"### {i}. {ex['task']}",
                "",
                f"![{ex['task']} example]({ex['image']})",
                "",
                f"- question: {_cell(ex['question'], 300)}",
                f"- reference answer: `{_cell(ex['reference'])}`",
                f"- original: `{_cell(ex['original_answer'] or '')}` ({mark[ex['original_correct']]})",
                f"- pruned: `{_cell(ex['pruned_answer'])}` ({mark[ex['pruned_correct']]})",
                "",
            ]
    lines += [
        "## Agreement with the original (held-out, next token)",
        "",
        "| split | tokens | top-1 agreement | KL (nats) | ppl original | ppl pruned |",
        "|---|---|---|---|---|---|",
    ]
    m = report["metrics"]
    for label, entry in (
        [("overall", m["overall"])]
        + [(f"source: {k}", v) for k, v in m["by_source"].items()]
        + [(f"modality: {k}", v) for k, v in m["by_modality"].items()]
    ):
        lines.append(
            f"| {label} | {entry.get('tokens', 0)} | {_fmt(entry.get('agreement'))} | {_fmt(entry.get('kl'))} "
            f"| {_fmt(entry.get('ppl_original'), '.2f')} | {_fmt(entry.get('ppl_pruned'), '.2f')} |"
        )
    tasks = {t: e for t, e in report.get("tasks", {}).items() if e.get("answer_tokens")}
    if tasks:
        lines += [
            "",
            "## Reference answers per task (teacher-forced, next token)",
            "",
            "| task | answer tokens | top-1 agreement | KL (nats) | every answer token top-1: original | pruned |",
            "|---|---|---|---|---|---|",
        ]
        for t, e in tasks.items():
            lines.append(
                f"| {t} | {e['answer_tokens']} | {_fmt(e.get('agreement'))} | {_fmt(e.get('kl'))} "
                f"| {_fmt(e.get('teacher_forced_accuracy_original'), '.0%')} "
                f"| {_fmt(e['teacher_forced_accuracy_pruned'], '.0%')} |"
            )
    lines += [
        "",
        "## Expert usage (normalised entropy of routed counts, pruned model)",
        "",
        "| block | entropy |",
        "|---|---|",
    ]
    lines += [f"| {k} | {_fmt(v, '.3f')} |" for k, v in m["usage_entropy"].items()]
    g = report["generation"]
    share = g["pruned_degenerate_share"]
    lines += ["", "## Generation (greedy)", ""]
    if g.get("mode") == "skip":
        lines += [g["note"][0].upper() + g["note"][1:] + "."]
        return "\n".join(lines + [""] + [f"![{f}]({f})" for f in figures]) + "\n"
    if g.get("note"):
        lines += [g["note"][0].upper() + g["note"][1:] + ".", ""]
    lines += [
        (
            f"Degenerate (prompts without a reference answer): pruned {share:.0%}"
            + (
                f", original {g['original_degenerate_share']:.0%}"
                if g.get("original_degenerate_share") is not None
                else ""
            )
        )
        if share is not None
        else "Every prompt has a reference answer: judged by exact match above.",
        "",
        "| prompt | reference | original | pruned | flags |",
        "|---|---|---|---|---|",
    ]
    for s in g["samples"]:
        cell = [
            s["prompt"],
            s.get("reference", ""),
            s.get("original_answer") or "",
            s["answer"],
            "; ".join(s["degenerate"]) if "reference" not in s else ("right" if s["correct"] else "wrong"),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cell) + " |")
    lines += [""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _agreement_png(report: dict, path: Path) -> None:
    from .report import _plt

    plt = _plt()
    items = [
        (k, v.get("agreement")) for k, v in report["metrics"]["by_source"].items() if v.get("agreement") is not None
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([k for k, _ in items], [v for _, v in items], color="tab:green")
    ax.set_ylim(0, 1)
    ax.set_ylabel("top-1 agreement with the original")
    ax.set_title("held-out agreement by domain")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _report_guard(models: list, meta_path: Path) -> dict:
    return dict(
        what="report folder",
        setting="REAP_REPORT_PATH (--report-path)",
        models=[Path(m) for m in models if m],
        files=[meta_path],
        replace=True,  # a report of this tool is replaced by the next test run; any other folder never is
    )


def write_report(
    report: dict, target: Path, meta_path: Path, images: dict | None = None, settings: TestSettings | None = None
) -> None:
    """report.json, report.md, figures, the example images (`images`: report-relative name -> PIL image) and
    the settings, written to a temporary folder and renamed into place.

    Call with the target's lock held (run does). The target is guarded again here: it never overlaps a model
    folder nor holds the metadata, and only a folder with the tool's marker is replaced (reap_vlm.outputs)."""
    target = Path(target)
    outputs.guard_dir(target, **_report_guard([report.get("pruned"), report.get("original")], meta_path))
    target.parent.mkdir(parents=True, exist_ok=True)
    outputs.resolve_leftovers(target)
    tmp = outputs.temp_dir(target)
    tmp.mkdir()
    try:
        figures = []
        if report["original"] and report["metrics"]["by_source"]:
            _agreement_png(report, tmp / "agreement_by_domain.png")
            figures.append("agreement_by_domain.png")
        if before_after(report):
            from .report import before_after_png

            before_after_png(report, tmp / "before_after.png")
            figures.append("before_after.png")
        for name, image in (images or {}).items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            image.save(tmp / name)
        if meta_path.is_file():
            from .report import heatmap_png

            meta = metadata.read(meta_path)
            if meta["plan"].get("criterion"):
                heatmap_png(meta, tmp / "saliency_heatmap.png", meta["plan"]["criterion"])
                figures.append("saliency_heatmap.png")
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "report.md").write_text(_markdown(report, figures))
        if settings is not None:
            dump(settings, tmp / "test_settings.json")
        outputs.write_marker(tmp, "test report")  # last: a folder with the marker is complete
        outputs.put_in_place(tmp, target, "report folder", replace=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _examples(samples, generations: list[dict], n: int = EXAMPLES) -> tuple[list[dict], dict]:
    """Up to n image questions for the report, one per task where possible: first those the pruned model
    got wrong and the original right, then those both got right, then the rest. (entries, images)."""
    by_id = {s.id: s for s in samples}
    pool = [g for g in generations if "reference" in g and by_id[g["sample"]].images]

    def rank(g):
        original = g.get("original_correct")
        return (0 if original and not g["correct"] else 1 if original and g["correct"] else 2), g["sample"]

    chosen, tasks = [], set()
    for g in sorted(pool, key=rank):  # distinct tasks first ...
        if len(chosen) < n and g["task"] not in tasks:
            chosen.append(g)
            tasks.add(g["task"])
    for g in sorted(pool, key=rank):  # ... then fill up
        if len(chosen) < n and g not in chosen:
            chosen.append(g)
    entries, images = [], {}
    for i, g in enumerate(chosen, 1):
        name = f"examples/{i}_{''.join(c if c.isalnum() else '_' for c in g['task'])}.png"
        images[name] = by_id[g["sample"]].images[0]
        entries.append(
            {
                "sample": g["sample"],
                "task": g["task"],
                "image": name,
                "question": by_id[g["sample"]].text,
                "reference": g["reference"],
                "original_answer": g.get("original_answer"),
                "original_correct": g.get("original_correct"),
                "pruned_answer": g["answer"],
                "pruned_correct": g["correct"],
            }
        )
    return entries, images


def _share(generations: list[dict], flag) -> float | None:
    free = [g for g in generations if "reference" not in g]  # answered prompts are judged by exact match
    return sum(bool(flag(g)) for g in free) / len(free) if free else None


def run(settings: TestSettings) -> int:
    """The stage, holding the report folder's lock: a second test run on the same report fails at once."""
    models = [settings.pruned_dir, settings.original_model_path or settings.model_path]
    outputs.guard_dir(settings.report_dir, **_report_guard(models, settings.metadata_file))
    with outputs.locked(settings.report_dir):
        return _run(settings)


def memory_need(pruned_dir: Path, original_dir: Path | None, settings: TestSettings) -> int:
    """Bytes the in-memory comparison needs on the GPU(s): both models' weights as `verify` counts them
    (dequantized for a quantized checkpoint), both models' full logits of one batch in fp32, and 1 GiB."""
    from .verify import describe

    total = 0
    for model_dir in (pruned_dir, original_dir):
        if model_dir:
            info = describe(Path(model_dir), None)
            total += info.get("bytes_dequantized") or sum(info["bytes"].values())
    config = read_config(pruned_dir)
    vocab = (config.get("text_config") or {}).get("vocab_size") or config.get("vocab_size") or 0
    return total + 2 * settings.batch_size * settings.max_seq_len * vocab * 4 + 2**30


def choose_execution(settings: TestSettings, pruned_dir: Path, original_dir: Path | None, gpu_free=None):
    """REAP_EXECUTION for the test stage (reap_vlm.execution.choose with the comparison's estimate;
    `gpu_free`: free bytes per GPU in use, default asked of CUDA)."""
    from .execution import choose

    what = "the pruned and the original model's weights + the comparison's logits"
    return choose(settings, gpu_free=gpu_free, need=lambda: (memory_need(pruned_dir, original_dir, settings), what))


def generation_mode(settings: TestSettings, execution) -> str:
    """REAP_GENERATION resolved: auto generates in memory, or offloaded when the comparison is streamed."""
    if settings.generation != "auto":
        return settings.generation
    return "memory" if execution.mode == "memory" else "offload"


def spread(samples, n: int) -> list:
    """At most n prompts: one task or source after another, image and text groups alternating (image
    first), each group's prompts in held-out order; returned in held-out order."""
    groups: dict[str, list] = {}
    for s in samples:
        groups.setdefault(task_of(s) if s.answer.strip() else s.source, []).append(s)
    by_kind = [[g for g in groups.values() if bool(g[0].images) == image] for image in (True, False)]
    order = [g for pair in zip(*by_kind, strict=False) for g in pair]
    order += [g for kind in by_kind for g in kind[min(map(len, by_kind)) :]]
    chosen: set[str] = set()
    for depth in range(max((len(g) for g in order), default=0)):
        for group in order:
            if depth < len(group) and len(chosen) < n:
                chosen.add(group[depth].id)
    return [s for s in samples if s.id in chosen]


def offload_budget(settings: TestSettings) -> dict:
    """accelerate's max_memory for offloaded generation: per GPU in use 90 % of what this process may still
    allocate (its free memory, or less under torch.cuda.set_per_process_memory_fraction) less 1 GiB
    (activations and the KV cache), REAP_STREAM_CACHE_GB of RAM; the rest of the weights is read from disk."""
    budget: dict = {"cpu": int(settings.stream_cache_gb * 2**30)}
    if settings.device != "cpu" and torch.cuda.is_available():
        indices = range(torch.cuda.device_count())
        if settings.device.startswith("cuda:"):
            indices = [int(settings.device.split(":")[1])]
        fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _i: 1.0)
        for i in indices:
            allowed = torch.cuda.get_device_properties(i).total_memory * fraction(i) - torch.cuda.memory_allocated(i)
            budget[i] = max(0, int(0.9 * min(torch.cuda.mem_get_info(i)[0], allowed)) - 2**30)
    return budget


def generate_offloaded(model_dir: Path, settings: TestSettings, kwargs: dict, prompts, label: str, names) -> list:
    """generate() with the model loaded under accelerate's offload (offload_budget), its offload folder beside
    the report; the model is freed and the folder removed before this returns."""
    parent = settings.report_dir.parent
    parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=".reap_offload_", dir=parent))
    try:
        console.step(f"loading {model_dir} with offload")
        model, processor, _ = load_model(model_dir, **kwargs, offload=(offload_budget(settings), folder))
        try:
            return generate(model, processor, prompts, settings.max_new_tokens, settings, label, names)
        finally:
            del model
            gc.collect()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _generate_all(settings, gen_mode, prompts, names, pruned_dir, original_dir, kwargs, keep: bool) -> tuple:
    """Greedy generations of the pruned model and, with the original, its answers beside them. Returns
    (generations, (pruned, original, processor)): with `keep` and REAP_GENERATION=memory the models loaded
    whole, for compare; else Nones (and never two models in memory at once)."""
    if gen_mode == "skip":
        return [], (None, None, None)
    if gen_mode == "offload":
        generations = generate_offloaded(pruned_dir, settings, kwargs, prompts, "generating (pruned, offloaded)", names)
        if original_dir:
            label = "generating (original, offloaded)"
            _pair(generations, generate_offloaded(Path(original_dir), settings, kwargs, prompts, label, names))
        return generations, (None, None, None)
    console.step(f"loading {pruned_dir}")
    pruned, processor, _ = load_model(pruned_dir, **kwargs)
    generations = generate(pruned, processor, prompts, settings.max_new_tokens, settings, "generating (pruned)", names)
    if not keep:
        del pruned
        gc.collect()
        pruned = None
    original = None
    if original_dir:
        console.step(f"loading {original_dir}")
        original, _, _ = load_model(original_dir, **kwargs)
        label = "generating (original)"
        _pair(generations, generate(original, processor, prompts, settings.max_new_tokens, settings, label, names))
        if not keep:
            del original
            gc.collect()
            original = None
    return generations, (pruned, original, processor)


def _pair(generations: list[dict], answers: list[dict]) -> None:
    for g, o in zip(generations, answers, strict=True):
        g["original_answer"], g["original_degenerate"] = o["answer"], o["degenerate"]
        if "correct" in o:
            g["original_correct"] = o["correct"]


OFFLOADED = (
    "greedy generation with accelerate's offload (REAP_GENERATION=offload: at most REAP_STREAM_CACHE_GB of weights "
    "in RAM, the rest read from disk)"
)
GENERATION_NOTES = {
    "offload": (
        OFFLOADED + " on {n} of {total} held-out prompts (REAP_OFFLOAD_PROMPTS); the per-task exact-match check is "
        "teacher-forced on every held-out question"
    ),
    "offload-all": OFFLOADED + " on all {n} held-out prompts",
    "skip": (
        "generation skipped (REAP_GENERATION=skip): the verdict rests on the teacher-forced metrics (agreement, "
        "KL, perplexity, and per task the exact match of every answer token at top-1)"
    ),
}


def _run(settings: TestSettings) -> int:
    pruned_dir = settings.pruned_dir
    checks = structural_check(pruned_dir, settings.metadata_file)
    original_dir = settings.original_model_path or settings.model_path
    execution = choose_execution(settings, pruned_dir, original_dir)
    gen_mode = generation_mode(settings, execution)
    config = read_config(pruned_dir)
    if execution.mode == "stream":  # refuse a family streaming does not support before anything is loaded
        from .execution.stream import check_streamable

        for model_dir in (pruned_dir, original_dir):
            if model_dir:
                check_streamable(read_config(Path(model_dir)))
    console.info(f"execution: {execution.mode} ({execution.reason}); generation: {gen_mode}")
    console.step("reading the held-out samples")
    samples = heldout(settings)
    kwargs = dict(
        device=settings.device,
        dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code,
        attn_implementation=settings.attn_implementation,
    )
    skipped_images = 0
    if not is_vision_language(config):  # a text model cannot see the images: its questions say nothing
        skipped_images = sum(bool(s.images) for s in samples)
        samples = [s for s in samples if not s.images]
    names = name_tasks(samples)
    prompts = (
        samples if gen_mode == "memory" else spread(samples, settings.offload_prompts) if gen_mode == "offload" else []
    )
    generations, (pruned, original, processor) = _generate_all(
        settings, gen_mode, prompts, names, pruned_dir, original_dir, kwargs, keep=execution.mode == "memory"
    )
    streamed = None
    if execution.mode == "memory":
        if pruned is None:
            console.step(f"loading {pruned_dir}")
            pruned, processor, _ = load_model(pruned_dir, **kwargs)
            if original_dir:
                console.step(f"loading {original_dir}")
                original, _, _ = load_model(original_dir, **kwargs)
        metrics = compare(pruned, original, processor, samples, settings)
    else:
        metrics, streamed = compare_streamed(pruned_dir, original_dir, samples, settings)
    scope = "none" if gen_mode == "skip" else "all" if len(prompts) == len(samples) else "some"
    tasks = task_accuracy(generations) if scope == "all" else {}
    for task, entry in metrics.pop("answers_by_task").items():
        tasks.setdefault(task, {}).update(entry)
    kind_of = {s.id: s.kind for s in samples}
    kinds = {name: kind_of[sample_id] for sample_id, name in names.items()}
    for task, entry in tasks.items():
        entry["kind"] = kinds.get(task, "text")
    examples, images = _examples(samples, generations)
    from .report import pruning_summary

    meta = metadata.read(settings.metadata_file) if settings.metadata_file.is_file() else None
    with_original = bool(original_dir) and bool(generations)
    report = {
        "pruned": str(pruned_dir),
        "original": str(original_dir) if original_dir else None,
        "pruning": pruning_summary(pruned_dir, Path(original_dir) if original_dir else None, meta),
        "samples": len(samples),
        "skipped_image_samples": skipped_images,
        "execution": {"mode": execution.mode, "reason": execution.reason, **(streamed or {})},
        "structure": checks,
        "metrics": metrics,
        "tasks": tasks,
        "examples": examples,
        "generation": {
            "mode": gen_mode,
            "scope": scope,
            "prompts": len(prompts),
            "note": GENERATION_NOTES[gen_mode if scope != "all" else "offload-all"].format(
                n=len(prompts), total=len(samples)
            )
            if gen_mode != "memory"
            else None,
            "pruned_degenerate_share": _share(generations, lambda g: g["degenerate"]),
            "samples": generations,
            "original_degenerate_share": _share(generations, lambda g: g["original_degenerate"])
            if with_original
            else None,
            "newly_degenerate_share": _share(generations, lambda g: g["degenerate"] and not g["original_degenerate"])
            if with_original
            else None,
        },
        "thresholds": {
            k: getattr(settings, k)
            for k in (
                "min_agreement",
                "max_kl",
                "max_ppl_ratio",
                "max_accuracy_drop",
                "max_repeat_ratio",
                "max_degenerate_share",
            )
        },
    }
    if scope == "some":
        report["generation"]["accuracy_by_task"] = task_accuracy(generations)
    report["failures"] = verdict(report, settings)
    report["passed"] = not report["failures"]
    console.step("writing the report and its charts")
    write_report(report, settings.report_dir, settings.metadata_file, images, settings)
    if original_dir:
        from .card import record_results

        record_results(pruned_dir, report)  # the headline numbers in the pruned checkpoint's model card
    o = metrics["overall"]
    share = report["generation"]["pruned_degenerate_share"]
    console.info(
        f"held-out: agreement {o.get('agreement', float('nan')):.3f}, KL {o.get('kl', float('nan')):.4f}, "
        f"ppl {o.get('ppl_original', float('nan')):.2f} -> {o.get('ppl_pruned', float('nan')):.2f}"
        + (f"; degenerate generations {share:.0%}" if share is not None else "")
    )
    table = before_after(report)
    if table:
        width = max(len(r[0]) for r in table)
        console.info("before -> after (original, pruned, change):")
        for what, before, after, change in table:
            console.info(f"  {what:{width}s}  {before:>8s} -> {after:<8s} {change}")
    console.info(f"report written to {settings.report_dir}/report.md")
    console.set_result(
        {
            "report": str(settings.report_dir / "report.md"),
            "report_json": str(settings.report_dir / "report.json"),
            "verdict": "fail" if report["failures"] else "pass",
            "failures": report["failures"],
            "execution": execution.mode,
            "generation": gen_mode,
            "samples": len(samples),
            "overall": {k: o.get(k) for k in ("agreement", "kl", "ppl_original", "ppl_pruned")},
            "accuracy": {t: {k: e.get(k) for k in ("accuracy_original", "accuracy_pruned")} for t, e in tasks.items()},
        }
    )
    if report["failures"]:
        console.info("FAIL:\n" + "\n".join(f"  - {f}" for f in report["failures"]))
        return EXIT_FAILED
    console.info("PASS")
    return 0
