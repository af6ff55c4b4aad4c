"""The demo: end to end on the trained demo VLM (the default: its report's before -> after table and a PASS at the
demo's prune ratio), and on a random tiny model (--model tiny)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from reap_vlm import demo

ROOT = Path(__file__).resolve().parents[1]


def _demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "reap_vlm.demo", "--output-path", str(out), *args],
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def test_tiny_demo_runs_every_stage_end_to_end(tmp_path):
    out = tmp_path / "demo"
    result = _demo(out, "--model", "tiny")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "tiny qwen3_vl_moe checkpoint written" in result.stdout and "Demo finished" in result.stdout
    assert "before -> after" in result.stdout and "PASS" in result.stdout
    meta = json.loads((out / "reap_metadata.json").read_text())
    assert meta["scoring"]["mode"] == "full" and meta["calibration"]["tokens"]["image"] > 0
    config = json.loads((out / "pruned" / "config.json").read_text())
    assert config["text_config"]["num_local_experts"] == 4 and "reap_pruning" in config
    report = json.loads((out / "report" / "report.json").read_text())
    assert report["passed"] and report["metrics"]["overall"]["agreement"] > 0.5
    assert report["tasks"] and set(report["metrics"]["text_by_source"]) == {"code", "general", "math", "writing"}
    for name in (
        "reap_heatmap.png",
        "reap_modality.png",
        "reap_candidates.png",
        "reap_settings.json",
        "prune_settings.json",
    ):
        assert (out / name).is_file(), name


def test_trained_model_is_refused_clearly_when_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_VLM", tmp_path / "nowhere")
    assert demo.main(["--model", "trained", "--output-path", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "the trained demo model is not in this checkout" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_demo_runs_on_the_trained_model_by_default(tmp_path):
    """`./run.sh demo` as a newcomer runs it: the shipped demo VLM, pruned at the demo's ratio, judged by the test
    stage; the report shows the before -> after table and example images. The verdict is the measurement's
    (at the demo's ratio the chosen plan loses the position task: README); the exit code follows it."""
    out = tmp_path / "demo"
    result = _demo(out)
    assert result.returncode in (0, 1), result.stdout[-3000:] + result.stderr[-3000:]
    assert "trained demo VLM copied" in result.stdout and "before -> after" in result.stdout
    assert "Demo finished" in result.stdout and "test report" in result.stdout
    source = json.loads((demo.DEMO_VLM / "config.json").read_text())["text_config"]["num_local_experts"]
    config = json.loads((out / "pruned" / "config.json").read_text())
    kept = round(source * (1 - float(demo.TRAINED_RATIO)))
    assert config["text_config"]["num_local_experts"] == kept and "reap_pruning" in config
    meta = json.loads((out / "reap_metadata.json").read_text())
    assert meta["plan"]["chosen_by"].startswith("auto") and meta["candidates"]["rows"]
    report = json.loads((out / "report" / "report.json").read_text())
    assert (result.returncode == 0) == report["passed"] == (not report["failures"])
    tasks = report["tasks"]  # the trained model knows its tasks: the original answers well above chance
    assert len(tasks) == 7 and all(t["kind"] == "image" for t in tasks.values())
    assert sum(t["correct_original"] for t in tasks.values()) / sum(t["samples"] for t in tasks.values()) > 0.8
    assert set(report["metrics"]["text_by_source"]) == {"code", "general", "math", "writing"}
    md = (out / "report" / "report.md").read_text()
    assert "## Before → after" in md and "## Examples" in md and len(report["examples"]) == 3
    for ex in report["examples"]:
        assert (out / "report" / ex["image"]).is_file()
