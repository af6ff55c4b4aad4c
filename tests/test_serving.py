"""Serving the result (docs/serving.md): reap → prune → test on a tiny Qwen3-VL-MoE with a source model card,
then the pruned card carries the test stage's numbers, and its transformers snippet, run as a user would
copy it, loads the pruned checkpoint and generates from an image."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from reap_vlm import evaluate
from reap_vlm.calibration import CALIBRATION_DIR
from reap_vlm.cli import main
from reap_vlm.evaluate import before_after
from reap_vlm.prune import run as prune_run
from reap_vlm.reap import run as reap_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tested(tmp_path_factory, tiny_vl_dir):
    base = tmp_path_factory.mktemp("serving")
    src = base / "source"
    shutil.copytree(tiny_vl_dir, src)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n\n# Source\n")
    out = base / "out"
    common = ["--model-path", str(src), "--output-path", str(out), "--device", "cpu", "--dtype", "float32"]
    # one measured ratio with a few held-out samples: the report's candidate table then has a chosen plan
    reap = ["--scoring-mode", "router", "--max-samples", "8", "--max-seq-len", "64", "--eval-samples", "4"]
    reap += ["--eval-ratios", ""]
    assert main("reap", reap_run, [*common, *reap, "--calibration", "combined", "--no-plots"]) == 0
    assert main("prune", prune_run, common) == 0
    test = ["--eval-data", "tasks:4,code:2", "--max-new-tokens", "4", "--max-seq-len", "96"]
    code = main("test", evaluate.run, [*common, *test])
    assert code in (0, 1)  # random weights: the verdict may go either way; the numbers are what matter here
    return out / "pruned", json.loads((out / "report" / "report.json").read_text()), code


def test_report_opens_with_what_was_pruned_and_the_sizes(tested):
    pruned, report, _ = tested
    s = report["pruning"]
    assert (s["experts_before"], s["experts_after"], s["moe_layers"]) == (8, 4, 3)
    weights = sum(f.stat().st_size for f in pruned.glob("*.safetensors"))
    assert 0 < s["bytes_after"] < s["bytes_before"] and s["bytes_after"] <= weights  # tensors, without headers
    md = (pruned.parent / "report" / "report.md").read_text()
    head = md.split("## Before → after")[0]
    assert "## What was pruned" in head and "- experts: 8 pruned to 4 per MoE layer, in 3 MoE layers" in head
    assert f"({100 * (1 - s['bytes_after'] / s['bytes_before']):.1f} % smaller)" in head
    chosen = [c for c in s["candidates"] if c["chosen"]]
    assert len(chosen) == 1 and f"| **{chosen[0]['plan']}** |" in head and head.count("**✓ chosen**") == 1


def test_card_carries_the_test_stage_numbers(tested):
    pruned, report, code = tested
    card = ModelCard.load(pruned / "README.md")
    assert card.data.license == "apache-2.0"
    verdict = "PASS" if code == 0 else "FAIL"
    assert f"**{verdict}** on {report['samples']} held-out samples" in card.text
    rows = before_after(report)
    assert rows and all(f"| {what} | {b} | {a} | {c} |" in card.text for what, b, a, c in rows)
    assert f"agreement with the original {report['metrics']['overall']['agreement']:.3f}" in card.text


def test_the_cards_transformers_snippet_loads_the_pruned_model_and_generates(tested, tmp_path):
    pruned, _, _ = tested
    text = ModelCard.load(pruned / "README.md").text
    (snippet,) = re.findall(r"```python\n(.*?)```", text, re.S)
    image = next((CALIBRATION_DIR / "vision" / "photos").iterdir())
    snippet = re.sub(r'^MODEL = ".*"', f"MODEL = {str(pruned)!r}", snippet, flags=re.M)
    snippet = re.sub(r'^IMAGE = ".*"', f"IMAGE = {str(image)!r}", snippet, flags=re.M)
    snippet = snippet.replace("max_new_tokens=64", "max_new_tokens=6")
    snippet += '\nprint("new tokens:", out.shape[1] - inputs["input_ids"].shape[1])\n'
    (tmp_path / "snippet.py").write_text(snippet)
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    result = subprocess.run(
        [sys.executable, "snippet.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**env, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    new_tokens = int(re.search(r"new tokens: (\d+)", result.stdout).group(1))
    assert 1 <= new_tokens <= 6, result.stdout  # greedy generation may stop early at an end-of-sequence token
    config = json.loads((pruned / "config.json").read_text())
    assert config["text_config"]["num_local_experts"] == 4  # the loader built the pruned expert count
