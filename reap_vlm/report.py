"""Figures and the markdown pieces shared by the reap and test stages (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _matrix(meta: dict, criterion: str, modality: str = "all") -> tuple[np.ndarray, list[str]]:
    from .scoring import criterion_scores

    keys = [b["key"] for b in meta["model"]["blocks"]]
    width = max(b["num_experts"] for b in meta["model"]["blocks"])
    m = np.full((len(keys), width), np.nan)
    for i, key in enumerate(keys):
        scores = criterion_scores(meta["layers"][key]["stats"][modality], criterion)
        m[i, : len(scores)] = np.where(np.isfinite(scores), scores, np.nan)
    return m, keys


def _grid_size(columns: int, rows: int) -> tuple[float, float]:
    """Figure inches for a rows × columns heatmap: cells stay visible on big models, and a small model still
    gets room for its title, axis labels and colorbar."""
    return min(max(6.0, 3.0 + columns * 0.12), 24.0), min(max(3.6, 1.8 + rows * 0.25), 16.0)


def heatmap_png(meta: dict, path: Path, criterion: str) -> Path:
    """Layers × experts heatmap of the criterion; removed experts are marked with a dot."""
    plt = _plt()
    m, keys = _matrix(meta, criterion)
    fig, ax = plt.subplots(figsize=_grid_size(m.shape[1], len(keys)), layout="constrained")
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    for i, key in enumerate(keys):
        layer = meta["layers"][key]
        if "kept" in layer:
            removed = sorted(set(range(len(layer["stats"]["all"]["count"]))) - set(layer["kept"]))
            ax.scatter(removed, [i] * len(removed), s=8, c="red", marker="o", label="removed" if i == 0 else None)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE block (layer.set)")
    ax.set_yticks(range(len(keys)), keys, fontsize=6)
    ax.set_title(f"expert saliency: {criterion} (red = removed)", fontsize=10)
    fig.colorbar(im, ax=ax, label=f"{criterion} score")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def modality_png(meta: dict, path: Path) -> Path:
    """Share of each expert's routed tokens that are image tokens, per layer (VLMs)."""
    plt = _plt()
    keys = [b["key"] for b in meta["model"]["blocks"]]
    rows = []
    for key in keys:
        stats = meta["layers"][key]["stats"]
        img, txt = np.array(stats["image"]["count"]), np.array(stats["text"]["count"])
        with np.errstate(invalid="ignore", divide="ignore"):
            rows.append(np.where(img + txt > 0, img / np.maximum(img + txt, 1), np.nan))
    fig, ax = plt.subplots(figsize=_grid_size(len(rows[0]), len(keys)), layout="constrained")
    im = ax.imshow(np.array(rows), aspect="auto", cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE block (layer.set)")
    ax.set_yticks(range(len(keys)), keys, fontsize=6)
    ax.set_title("share of routed tokens that are image tokens", fontsize=10)
    fig.colorbar(im, ax=ax, label="image share")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def candidates_png(table: dict, path: Path) -> Path:
    """Held-out loss vs prune ratio, one line per criterion, with the unpruned baseline; the chosen plan is a
    star with its name, and the legend sits beside the axes, so it hides no line."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8.5, 4.2), layout="constrained")

    def line(r: dict) -> str:  # merge plans get their own line beside the pruning criteria
        return f"merge ({r['criterion']})" if r.get("policy") == "merge" else r["criterion"]

    for criterion in sorted({line(r) for r in table["rows"]}):
        pts = sorted(
            (r["ratio"], r["loss"])
            for r in table["rows"]
            if line(r) == criterion and r["ratio"] is not None and r["loss"] is not None
        )
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=criterion)
    if table["baseline"].get("loss") is not None:
        ax.axhline(table["baseline"]["loss"], color="black", linestyle="--", label="unpruned")
    ax.set_xlabel("prune ratio (fraction of experts removed)")
    ax.set_ylabel("held-out loss (nats / token)")
    chosen = table.get("chosen") or {}  # a row of the table: its ratio and measured loss
    if chosen.get("ratio") is not None and chosen.get("loss") is not None:
        ax.scatter(
            [chosen["ratio"]],
            [chosen["loss"]],
            marker="*",
            s=220,
            c="gold",
            edgecolors="black",
            zorder=5,
            label=f"chosen: {chosen.get('label', chosen.get('criterion'))}",
        )
    ax.set_title("candidate plans, measured by router masking")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def before_after_png(report: dict, path: Path) -> Path:
    """The test stage's before → after view: text perplexity per domain (left) and exact-match accuracy
    of greedy answers per task (right), original beside pruned."""
    plt = _plt()
    domains = {k: v for k, v in report["metrics"].get("text_by_source", {}).items() if v.get("tokens")}
    tasks = {k: v for k, v in report.get("tasks", {}).items() if "accuracy_pruned" in v}
    panels = [p for p in (("ppl", domains), ("acc", tasks)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (kind, entries) in zip(axes[0], panels, strict=True):
        names = list(entries)
        x = np.arange(len(names))
        key = "ppl" if kind == "ppl" else "accuracy"
        before = [entries[n].get(f"{key}_original") for n in names]
        after = [entries[n][f"{key}_pruned"] for n in names]
        scale = 1 if kind == "ppl" else 100
        if all(v is not None for v in before):
            ax.bar(x - 0.2, [v * scale for v in before], 0.4, label="original", color="tab:blue")
        ax.bar(x + 0.2, [v * scale for v in after], 0.4, label="pruned", color="tab:orange")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        if kind == "ppl":
            ax.set_ylabel("perplexity (lower is better)")
            ax.set_title("held-out text, per domain")
        else:
            ax.set_ylim(0, 100)
            ax.set_ylabel("exact match of greedy answers (%)")
            ax.set_title("held-out image questions, per task")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def pruning_summary(pruned: Path, original: Path | None, meta: dict | None) -> dict:
    """What was pruned and the sizes before → after, for the head of the test report: experts per MoE layer,
    the method and plan, the weights' bytes (safetensors headers only), and the candidate plans measured at
    the plan's ratio with the chosen one marked."""
    from .checkpoint import inspect_checkpoint

    after = inspect_checkpoint(pruned)
    info = after.config.get("reap_pruning") or {}
    out = {
        "method": info.get("method", "prune"),
        "criterion": info.get("criterion"),
        "modality": info.get("modality"),
        "ratio": info.get("ratio"),
        "moe_layers": len(after.blocks),
        "experts_before": (info.get("source") or {}).get("num_experts"),
        "experts_after": after.num_experts,
        "bytes_after": sum(t.nbytes for t in after.tensors.values()),
        "bytes_before": None,
        "candidates": [],
    }
    if original is not None:
        out["bytes_before"] = sum(t.nbytes for t in inspect_checkpoint(original).tensors.values())
    table = (meta or {}).get("candidates") or {}
    chosen = table.get("chosen") or {}
    from .candidates import _label

    for r in table.get("rows", []):
        if r.get("ratio") == chosen.get("ratio"):
            out["candidates"].append(
                {
                    "plan": _label(r),
                    "objective": r.get("objective"),
                    "loss": r.get("loss"),
                    "chosen": _label(r) == chosen.get("label"),
                }
            )
    out["candidates"].sort(key=lambda c: (c["objective"] is None, c["objective"] or 0.0))
    if chosen:
        out["chosen_by"] = chosen.get("reason")
    return out


def pruning_md(summary: dict | None) -> list[str]:
    """The test report's opening section from pruning_summary()."""
    if not summary:
        return []

    def gib(n):
        return "?" if n is None else f"{n / 2**30:.3f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"

    verb = "merged into" if summary["method"] == "merge" else "pruned to"
    before, after = summary["experts_before"], summary["experts_after"]
    plan = f"criterion `{summary['criterion']}`" + (f", policy `{summary['modality']}`" if summary["modality"] else "")
    lines = [
        "## What was pruned",
        "",
        f"- experts: {before if before is not None else '?'} {verb} {after} per MoE layer, in "
        f"{summary['moe_layers']} MoE layers" + (f" (ratio {summary['ratio']})" if summary["ratio"] else ""),
        f"- plan: {plan}" + (f" — {summary['chosen_by']}" if summary.get("chosen_by") else ""),
    ]
    b, a = summary["bytes_before"], summary["bytes_after"]
    lines.append(
        f"- weights: {gib(b)} → {gib(a)}" + (f" ({100 * (1 - a / b):.1f} % smaller)" if b else " (original not given)")
    )
    if summary["candidates"]:
        lines += [
            "",
            "Candidate plans the reap stage measured at this ratio (held-out fidelity, lower is better):",
            "",
            "| plan | objective | loss | chosen |",
            "|---|---|---|---|",
        ]
        for c in summary["candidates"]:
            obj = "-" if c["objective"] is None else f"{c['objective']:.4f}"
            loss = "-" if c["loss"] is None else f"{c['loss']:.4f}"
            mark = "**✓ chosen**" if c["chosen"] else ""
            name = f"**{c['plan']}**" if c["chosen"] else c["plan"]
            lines.append(f"| {name} | {obj} | {loss} | {mark} |")
    return [*lines, ""]
