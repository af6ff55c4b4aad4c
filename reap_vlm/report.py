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
    for criterion in sorted({r["criterion"] for r in table["rows"]}):
        pts = sorted(
            (r["ratio"], r["loss"])
            for r in table["rows"]
            if r["criterion"] == criterion and r["ratio"] is not None and r["loss"] is not None
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
