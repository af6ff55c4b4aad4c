"""The demo: end to end on the trained demo VLM (the default: its report's before -> after table and a PASS at the
demo's prune ratio), and on a random tiny model (--model tiny)."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from datetime import datetime
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


# The tiny demo's wall time on two idle cores (README): a slower run (a busy machine) scales the silence bound.
DEMO_IDLE_SECONDS = 20.0
MAX_SILENCE_SECONDS = 2.0
STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) (.*)$")
# every step that can take more than a few seconds on a real model has a progress bar with counts
BARS = (
    "encoding calibration",
    "scoring",
    "measuring plans",
    "writing",
    "hash check",
    "generating (pruned)",
    "generating (original)",
    "comparing with the original",
)


def silences(stderr: str) -> list[tuple[float, str, str]]:
    """(seconds, line before, line after) between consecutive timestamped lines, longest first."""
    stamped = [(datetime.strptime(m[1], "%H:%M:%S.%f"), m[2]) for m in map(STAMP.match, stderr.splitlines()) if m]
    gaps = [((b[0] - a[0]).total_seconds() % 86400, a[1], b[1]) for a, b in itertools.pairwise(stamped)]
    return sorted(gaps, reverse=True)


def test_tiny_demo_runs_every_stage_end_to_end(tmp_path):
    """At --verbose --json: every stage's result line parses, the human output is on stderr, and no step is
    silent for longer than MAX_SILENCE_SECONDS (scaled by how much slower than on idle cores this run was: the
    bound is about the code's granularity, not the machine's load)."""
    out = tmp_path / "demo"
    result = _demo(out, "--model", "tiny", "--verbose", "--json")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    err = result.stderr
    assert "tiny qwen3_vl_moe checkpoint written" in err and "Demo finished" in err
    assert "before -> after" in err and "PASS" in err
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # stdout holds the JSON lines only
    assert [line["stage"] for line in lines] == ["reap", "prune", "test", "demo"]
    assert all(line["exit_code"] == 0 for line in lines)
    reap_line, prune_line, test_line, demo_line = lines
    assert reap_line["metadata"] == str(out / "reap_metadata.json") and reap_line["plan"]["kept_per_block"]
    assert str(out / "reap_recipe.yaml") in reap_line["files"]
    assert prune_line["pruned"] == str(out / "pruned") and prune_line["experts"] == {"source": 8, "kept": 4}
    assert prune_line["bytes"]["pruned"] < prune_line["bytes"]["source"]
    assert test_line["verdict"] == "pass" and test_line["failures"] == [] and test_line["overall"]["agreement"] > 0.5
    assert demo_line["pruned model"] == str(out / "pruned") and demo_line["verdict"] == "pass"
    for bar in BARS:
        assert re.search(rf"^\S+ {re.escape(bar)}: \d+(\.\d+)?/\d+(\.\d+)? \w+ in ", err, re.M), bar
    bound = MAX_SILENCE_SECONDS * max(1.0, demo_line["seconds"] / DEMO_IDLE_SECONDS)
    longest = silences(err)[0]
    assert longest[0] <= bound, f"{longest[0]:.1f} s silent (bound {bound:.1f} s): {longest[1]!r} -> {longest[2]!r}"

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
        "reap_recipe.yaml",
        "prune_settings.json",
        "pruned/reap_recipe.yaml",
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
    assert "trained demo VLM copied" in result.stderr and "before -> after" in result.stderr
    assert "Demo finished" in result.stderr and "test report" in result.stderr
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
