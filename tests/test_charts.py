"""The reap stage's charts stay readable at any model size: every title, axis label and colorbar label lies
inside the figure, colorbars are labelled, and the candidate chart marks the chosen plan outside the legend."""

from __future__ import annotations

import copy

import matplotlib
import pytest
from matplotlib.figure import Figure

from reap_vlm import report

matplotlib.use("Agg")


def _meta(layers: int, experts: int) -> dict:
    import numpy as np

    rng = np.random.default_rng(0)
    blocks, stats = [], {}
    for i in range(layers):
        key = f"{i}.experts"
        blocks.append({"key": key, "layer": i, "expert_set": "experts", "num_experts": experts})
        count = rng.integers(1, 100, experts).tolist()
        one = {
            "count": count,
            "gate_sum": rng.random(experts).tolist(),
            "reap_sum": rng.random(experts).tolist(),
            "ean_sum": rng.random(experts).tolist(),
            "max_act": rng.random(experts).tolist(),
            "tokens": 1000,
        }
        stats[key] = {
            "stats": {m: copy.deepcopy(one) for m in ("all", "text", "image")},
            "kept": list(range(experts // 2)),
        }
    return {"model": {"blocks": blocks}, "layers": stats}


@pytest.fixture
def figures(monkeypatch):
    seen = []
    save = Figure.savefig

    def record(self, *args, **kwargs):
        seen.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return seen


def _draw(fig: Figure):
    """The renderer of a figure drawn again (the chart functions close their figures after saving)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return canvas.get_renderer()


def _inside(fig: Figure) -> None:
    renderer = _draw(fig)
    box = fig.bbox
    for ax in fig.axes:
        for artist in (ax.title, ax.xaxis.label, ax.yaxis.label):
            if artist.get_text():
                extent = artist.get_window_extent(renderer)
                assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1, artist.get_text()
                assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1, artist.get_text()


@pytest.mark.parametrize(("layers", "experts"), [(1, 4), (3, 8), (48, 128)])
def test_heatmaps_fit_their_labels_at_any_size(layers, experts, tmp_path, figures):
    meta = _meta(layers, experts)
    try:
        report.heatmap_png(meta, tmp_path / "h.png", "frequency")
        report.modality_png(meta, tmp_path / "m.png")
    except KeyError as err:  # the synthetic stats miss a field a criterion needs
        pytest.fail(f"synthetic metadata lacks {err}")
    assert len(figures) == 2
    for fig in figures:
        _inside(fig)
        colorbar = fig.axes[-1]
        assert colorbar.get_ylabel(), "the colorbar has no label"
        width, height = fig.get_size_inches()
        assert width >= 6 and height >= 3.6


def test_candidate_chart_marks_the_chosen_plan_beside_the_legend(tmp_path, figures):
    rows = [
        {"criterion": c, "policy": "balanced", "ratio": r, "loss": 2.0 + r + i / 10}
        for i, c in enumerate(["reap", "frequency", "ean_sum", "soft_reap"])
        for r in (0.25, 0.5, 0.75)
    ]
    chosen = {**rows[1], "label": "reap/balanced"}
    report.candidates_png({"rows": rows, "baseline": {"loss": 1.9}, "chosen": chosen}, tmp_path / "c.png")
    (fig,) = figures
    ax = fig.axes[0]
    _inside(fig)
    legend = ax.get_legend()
    assert "chosen: reap/balanced" in [t.get_text() for t in legend.get_texts()]
    renderer = _draw(fig)
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # beside, not over
    stars = [c for c in ax.collections if tuple(c.get_offsets()[0]) == (0.5, chosen["loss"])]
    assert stars, "the chosen plan is not marked"
