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


def heatmap_png(meta: dict, path: Path, criterion: str) -> Path:
    """Layers × experts heatmap of the criterion; removed experts are marked with a dot."""
    plt = _plt()
    m, keys = _matrix(meta, criterion)
    fig, ax = plt.subplots(figsize=(min(2 + m.shape[1] * 0.12, 24), min(1.5 + len(keys) * 0.25, 16)))
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    for i, key in enumerate(keys):
        layer = meta["layers"][key]
        if "kept" in layer:
            removed = sorted(set(range(len(layer["stats"]["all"]["count"]))) - set(layer["kept"]))
            ax.scatter(removed, [i] * len(removed), s=8, c="red", marker="o", label="removed" if i == 0 else None)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE block (layer.set)")
    ax.set_yticks(range(len(keys)), keys, fontsize=6)
    ax.set_title(f"expert saliency: {criterion} (red = removed)")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
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
    fig, ax = plt.subplots(figsize=(min(2 + len(rows[0]) * 0.12, 24), min(1.5 + len(keys) * 0.25, 16)))
    im = ax.imshow(np.array(rows), aspect="auto", cmap="coolwarm", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_yticks(range(len(keys)), keys, fontsize=6)
    ax.set_title("share of routed tokens that are image tokens")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def candidates_png(table: dict, path: Path) -> Path:
    """Held-out loss vs prune ratio, one line per criterion, with the unpruned baseline."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))

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
    ax.set_title("candidate plans, measured by router masking")
    ax.legend(fontsize=7)
    fig.tight_layout()
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
