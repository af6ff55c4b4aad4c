"""The test stage: structural check, generation + degeneration, agreement / KL / perplexity against the
original on held-out data, expert usage, a report and a pass/fail verdict (exit 0 / 1)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from . import metadata
from .calibration import load_samples, make_batches, read_source
from .candidates import _token_metrics
from .checkpoint import inspect_checkpoint
from .degeneration import analyse
from .errors import EXIT_FAILED, CheckpointError, InputNotFoundError
from .loading import input_device, load_model
from .moe import find_moe_blocks
from .observe.usage import ExpertUsage, usage_entropy
from .settings import TestSettings, dump

PROMPT_CHARS = 400


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
            checks["plan_matches_metadata"] = all(kept.get(k) == v for k, v in info["kept"].items()) or "re-cut"
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
    if settings.eval_data == "builtin":
        return load_samples("combined", "evaluation", max_samples=settings.eval_samples, seed=settings.seed)
    path = settings.eval_data  # a user file: every row is held out
    return list(read_source(path, "calibration")) + list(read_source(path, "evaluation"))


def _prompt_messages(sample) -> list[dict]:
    if sample.kind == "image":
        return sample.messages
    return [
        {"role": "user", "content": [{"type": "text", "text": "Continue this text:\n\n" + sample.text[:PROMPT_CHARS]}]}
    ]


def generate(model, processor, samples, max_new_tokens: int, settings: TestSettings) -> list[dict]:
    tok = getattr(processor, "tokenizer", processor)
    device = input_device(model)
    out = []
    for s in samples:
        messages = _prompt_messages(s)
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if s.images:  # the checkpoint's own image-processor limits
            inputs = processor(text=[text], images=s.images, return_tensors="pt")
        else:
            inputs = tok(text, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in dict(inputs).items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
        with torch.inference_mode():
            ids = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
            )[0, inputs["input_ids"].shape[1] :]
        new = ids.tolist()
        answer = tok.decode(new, skip_special_tokens=True)
        out.append(
            {
                "sample": s.id,
                "source": s.source,
                "kind": s.kind,
                "prompt": s.text[:200],
                "answer": answer,
                **analyse(answer, new, max_repeat_ratio=settings.max_repeat_ratio),
            }
        )
    return out


def compare(pruned, original, processor, samples, settings: TestSettings) -> dict:
    """Agreement, KL and perplexity per source and modality; usage entropy per layer of the pruned model."""
    batches = list(make_batches(samples, processor, max_seq_len=settings.max_seq_len, batch_size=settings.batch_size))
    blocks = find_moe_blocks(pruned)
    rows = []
    with ExpertUsage(pruned, blocks) as usage, torch.inference_mode():
        for batch in batches:
            usage.batch(batch.modality)
            inputs = {k: v.to(input_device(pruned)) for k, v in batch.inputs.items()}
            if "pixel_values" in inputs:
                inputs["pixel_values"] = inputs["pixel_values"].to(pruned.dtype)
            p_logits = pruned(**inputs, use_cache=False).logits
            if original is not None:
                o_inputs = {k: v.to(input_device(original)) for k, v in inputs.items()}
                o_logits = original(**o_inputs, use_cache=False).logits.to(p_logits.device)
                ref = _token_metrics(o_logits, o_logits, inputs["input_ids"], batch.modality.to(p_logits.device))
            else:
                o_logits, ref = p_logits, None
            m = _token_metrics(o_logits, p_logits, inputs["input_ids"], batch.modality.to(p_logits.device))
            for r, s in enumerate(batch.samples):
                row = {"source": s.source, "kind": s.kind, **{k: float(v[r]) for k, v in m.items()}}
                row["nll_original"] = float(ref["nll"][r]) if ref is not None else None
                rows.append(row)
        counts = usage.totals()

    def summary(sel):
        tokens = sum(r["tokens"] for r in sel)
        if not tokens:
            return {"tokens": 0}
        out = {"tokens": int(tokens), "ppl_pruned": math.exp(min(sum(r["nll"] for r in sel) / tokens, 50))}
        if original is not None:
            out.update(
                agreement=sum(r["agree"] for r in sel) / tokens,
                kl=sum(r["kl"] for r in sel) / tokens,
                ppl_original=math.exp(min(sum(r["nll_original"] for r in sel) / tokens, 50)),
            )
        return out

    entropy = {key: usage_entropy(c) for key, c in counts.items()}
    return {
        "overall": summary(rows),
        "by_source": {s: summary([r for r in rows if r["source"] == s]) for s in sorted({r["source"] for r in rows})},
        "by_modality": {k: summary([r for r in rows if r["kind"] == k]) for k in sorted({r["kind"] for r in rows})},
        "usage_entropy": entropy,
    }


def verdict(report: dict, settings: TestSettings) -> list[str]:
    failures = []
    overall = report["metrics"]["overall"]
    if report["original"] and overall.get("tokens"):
        if overall["agreement"] < settings.min_agreement:
            failures.append(f"top-1 agreement {overall['agreement']:.3f} < REAP_MIN_AGREEMENT {settings.min_agreement}")
        if overall["kl"] > settings.max_kl:
            failures.append(f"KL(original || pruned) {overall['kl']:.4f} > REAP_MAX_KL {settings.max_kl}")
        ratio = overall["ppl_pruned"] / overall["ppl_original"]
        if ratio > settings.max_ppl_ratio:
            failures.append(f"perplexity ratio {ratio:.3f} > REAP_MAX_PPL_RATIO {settings.max_ppl_ratio}")
    gen = report["generation"]
    # With the original present, count what pruning broke: prompts whose pruned answer is degenerate while the
    # original's is not (an original that loops on a prompt says nothing about pruning). Without it: all.
    share = (
        gen["newly_degenerate_share"] if gen["newly_degenerate_share"] is not None else gen["pruned_degenerate_share"]
    )
    if share > settings.max_degenerate_share:
        what = "became degenerate after pruning" if gen["newly_degenerate_share"] is not None else "are degenerate"
        failures.append(
            f"{share:.0%} of generations {what} (> REAP_MAX_DEGENERATE_SHARE {settings.max_degenerate_share:.0%})"
        )
    return failures


def _markdown(report: dict, figures: list[str]) -> str:
    lines = [
        f"# REAP-VLM test report: {'PASS' if report['passed'] else 'FAIL'}",
        "",
        f"- pruned model: `{report['pruned']}`",
        f"- original: `{report['original'] or 'not given'}`",
        f"- held-out samples: {report['samples']}",
        "",
    ]
    if report["failures"]:
        lines += ["## Failing checks", ""] + [f"- {f}" for f in report["failures"]] + [""]
    lines += [
        "## Agreement with the original (held-out, next token)",
        "",
        "| split | tokens | top-1 agreement | KL (nats) | ppl original | ppl pruned |",
        "|---|---|---|---|---|---|",
    ]

    def fmt(v, spec=".4f"):
        return "-" if v is None else format(v, spec)

    m = report["metrics"]
    for label, entry in (
        [("overall", m["overall"])]
        + [(f"source: {k}", v) for k, v in m["by_source"].items()]
        + [(f"modality: {k}", v) for k, v in m["by_modality"].items()]
    ):
        lines.append(
            f"| {label} | {entry.get('tokens', 0)} | {fmt(entry.get('agreement'))} | {fmt(entry.get('kl'))} "
            f"| {fmt(entry.get('ppl_original'), '.2f')} | {fmt(entry.get('ppl_pruned'), '.2f')} |"
        )
    lines += [
        "",
        "## Expert usage (normalised entropy of routed counts, pruned model)",
        "",
        "| block | entropy |",
        "|---|---|",
    ]
    lines += [f"| {k} | {fmt(v, '.3f')} |" for k, v in m["usage_entropy"].items()]
    g = report["generation"]
    lines += [
        "",
        "## Generation (greedy)",
        "",
        f"Degenerate: pruned {g['pruned_degenerate_share']:.0%}"
        + (
            f", original {g['original_degenerate_share']:.0%}" if g.get("original_degenerate_share") is not None else ""
        ),
        "",
        "| prompt | original | pruned | flags |",
        "|---|---|---|---|",
    ]
    for s in g["samples"]:
        cell = [s["prompt"][:80], (s.get("original_answer") or "")[:80], s["answer"][:80], "; ".join(s["degenerate"])]
        lines.append("| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cell) + " |")
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


def write_report(report: dict, target: Path, meta_path: Path) -> None:
    """report.json, report.md and figures, written to a temporary folder and renamed into place."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.reap-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        figures = []
        if report["original"] and report["metrics"]["by_source"]:
            _agreement_png(report, tmp / "agreement_by_domain.png")
            figures.append("agreement_by_domain.png")
        if meta_path.is_file():
            from .report import heatmap_png

            meta = metadata.read(meta_path)
            if meta["plan"].get("criterion"):
                heatmap_png(meta, tmp / "saliency_heatmap.png", meta["plan"]["criterion"])
                figures.append("saliency_heatmap.png")
        (tmp / "report.json").write_text(json.dumps(report, indent=1) + "\n")
        (tmp / "report.md").write_text(_markdown(report, figures))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def run(settings: TestSettings) -> int:
    pruned_dir = settings.pruned_dir
    checks = structural_check(pruned_dir, settings.metadata_file)
    original_dir = settings.original_model_path or settings.model_path
    samples = heldout(settings)
    kwargs = dict(
        device=settings.device,
        dtype=settings.dtype,
        trust_remote_code=settings.trust_remote_code,
        attn_implementation=settings.attn_implementation,
    )
    pruned, processor, _ = load_model(pruned_dir, **kwargs)
    generations = generate(pruned, processor, samples, settings.max_new_tokens, settings)
    original = None
    if original_dir:
        original, _, _ = load_model(original_dir, **kwargs)
        for g, o in zip(
            generations, generate(original, processor, samples, settings.max_new_tokens, settings), strict=True
        ):
            g["original_answer"], g["original_degenerate"] = o["answer"], o["degenerate"]
    metrics = compare(pruned, original, processor, samples, settings)
    share = sum(bool(g["degenerate"]) for g in generations) / max(len(generations), 1)
    report = {
        "pruned": str(pruned_dir),
        "original": str(original_dir) if original_dir else None,
        "samples": len(samples),
        "structure": checks,
        "metrics": metrics,
        "generation": {
            "pruned_degenerate_share": share,
            "samples": generations,
            "original_degenerate_share": (
                sum(bool(g["original_degenerate"]) for g in generations) / max(len(generations), 1)
            )
            if original is not None
            else None,
            "newly_degenerate_share": (
                sum(bool(g["degenerate"]) and not g["original_degenerate"] for g in generations)
                / max(len(generations), 1)
            )
            if original is not None
            else None,
        },
        "thresholds": {
            k: getattr(settings, k)
            for k in ("min_agreement", "max_kl", "max_ppl_ratio", "max_repeat_ratio", "max_degenerate_share")
        },
    }
    report["failures"] = verdict(report, settings)
    report["passed"] = not report["failures"]
    write_report(report, settings.report_dir, settings.metadata_file)
    dump(settings, Path(settings.report_dir) / "test_settings.json")
    o = metrics["overall"]
    print(
        f"held-out: agreement {o.get('agreement', float('nan')):.3f}, KL {o.get('kl', float('nan')):.4f}, "
        f"ppl {o.get('ppl_original', float('nan')):.2f} -> {o.get('ppl_pruned', float('nan')):.2f}; "
        f"degenerate generations {share:.0%}"
    )
    print(f"report written to {settings.report_dir}/report.md")
    if report["failures"]:
        print("FAIL:\n" + "\n".join(f"  - {f}" for f in report["failures"]))
        return EXIT_FAILED
    print("PASS")
    return 0
