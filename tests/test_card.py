"""The pruned checkpoint's model card: the source card's front matter kept and extended, read back with
huggingface_hub.ModelCard.load; the merge relation; a source card with broken YAML; the test stage's numbers."""

from __future__ import annotations

import json
import shutil

import pytest
from huggingface_hub import ModelCard

from reap_vlm import card
from reap_vlm.cli import main
from reap_vlm.prune import run as prune_run
from reap_vlm.reap import run as reap_run

SOURCE_CARD = """---
license: other
license_name: qwen-research
license_link: https://example.com/LICENSE
language:
- en
- zh
tags:
- qwen
- vision
pipeline_tag: image-text-to-text
library_name: transformers
base_model: Qwen/Qwen3-VL-30B-A3B-Base
model-index:
- name: source
  results: []
---

# The source model

Original text of the source card.
"""
REAP = ["--scoring-mode", "router", "--max-samples", "8", "--max-seq-len", "64", "--eval-samples", "0"]


@pytest.fixture(scope="module")
def pruned_with_card(tmp_path_factory, tiny_vl_dir):
    base = tmp_path_factory.mktemp("card")
    src = base / "source"
    shutil.copytree(tiny_vl_dir, src)
    (src / "README.md").write_text(SOURCE_CARD)
    common = ["--model-path", str(src), "--output-path", str(base / "out"), "--device", "cpu"]
    assert main("reap", reap_run, [*common, *REAP, "--calibration", "code", "--no-plots"]) == 0
    assert main("prune", prune_run, [*common, "--base-model", "tiny-org/source-vl-moe"]) == 0
    return src, base / "out" / "pruned"


def test_pruned_card_round_trips_through_model_card_load(pruned_with_card):
    _src, pruned = pruned_with_card
    loaded = ModelCard.load(pruned / "README.md")
    data = loaded.data.to_dict()
    assert data["base_model"] == "tiny-org/source-vl-moe"  # the source, not the source's own base
    assert "base_model_relation" not in data  # the Hub knows no "pruned" relation
    assert (data["license"], data["license_name"], data["license_link"]) == (
        "other",
        "qwen-research",
        "https://example.com/LICENSE",
    )
    assert data["language"] == ["en", "zh"] and data["pipeline_tag"] == "image-text-to-text"
    assert data["library_name"] == "transformers"
    assert data["tags"] == ["qwen", "vision", "reap-vlm", "moe", "expert-pruning", "pruned"]
    assert "model-index" not in data and loaded.data.eval_results is None  # the source's results are not ours
    text = loaded.text
    assert text.lstrip().startswith("# source-vl-moe, pruned to 4 of 8 experts with REAP-VLM")
    assert "---" not in text.split("## Source model card")[0]  # one front matter block, at the top
    assert "## Source model card" in text and "Original text of the source card." in text
    assert "license_name" not in text  # the source's front matter is metadata, not body text
    assert "AutoModelForImageTextToText" in text and "vllm serve" in text
    assert card.NOT_TESTED in text
    config = json.loads((pruned / "config.json").read_text())
    assert "## How it was made" in text and config["reap_pruning"]["criterion"] in text
    assert (pruned / "README.md").stat().st_mode & 0o777 == 0o644


def test_card_of_a_source_without_card_and_without_hub_id(tmp_path, tiny_text_dir):
    provenance = {
        "source": {"architecture": "Qwen3MoeForCausalLM", "config_sha256": "ab" * 32},
        "criterion": "reap",
        "modality": "balanced",
        "ratio": 0.5,
        "scoring_mode": "full",
        "calibration": "combined",
    }
    text = card.build(
        provenance,
        json.loads((tiny_text_dir / "config.json").read_text()),
        num_experts=8,
        n_keep=4,
        moe_layers=2,
        src=tiny_text_dir,
        base_model=None,
    )
    loaded = ModelCard(text)
    assert "base_model" not in loaded.data.to_dict() and loaded.data.pipeline_tag == "text-generation"
    assert "AutoModelForCausalLM" in loaded.text and "## Source model card" not in loaded.text
    merged = card.build(
        {**provenance, "method": "merge", "merge": {"grouping": "ream", "group_size": 16, "router": "centroid"}},
        {"architectures": ["Qwen3MoeForCausalLM"]},
        num_experts=8,
        n_keep=4,
        moe_layers=2,
        src=tmp_path,
        base_model="org/m",
    )
    data = ModelCard(merged).data.to_dict()
    assert data["base_model_relation"] == "merge" and "expert-merging" in data["tags"]


def test_base_model_must_be_a_repo_id(pruned_with_card, capsys):
    src, pruned = pruned_with_card
    out = pruned.parent
    args = ["--model-path", str(src), "--output-path", str(out), "--pruned-model-path", str(out / "other")]
    assert main("prune", prune_run, [*args, "--base-model", "not a repo"]) == 2
    assert "REAP_BASE_MODEL='not a repo' is not a Hub repo id" in capsys.readouterr().err
    assert not (out / "other").exists()


def test_source_card_with_broken_front_matter_keeps_its_text(tmp_path, capsys):
    (tmp_path / "README.md").write_text("---\nlicense: [unclosed\n---\n\nBody kept.\n")
    source = card.source_card(tmp_path)
    assert source.data.to_dict() == {} and "Body kept." in source.text
    assert "front matter is not valid YAML" in capsys.readouterr().err


def test_test_results_replace_the_placeholder_and_each_other(pruned_with_card, tmp_path):
    _, pruned = pruned_with_card
    folder = tmp_path / "copy"
    shutil.copytree(pruned, folder)
    report = {
        "passed": False,
        "failures": ["bar count: exact match 100% -> 80%"],
        "samples": 12,
        "metrics": {
            "overall": {"agreement": 0.875, "kl": 0.0312},
            "text_by_source": {"code": {"tokens": 10, "ppl_original": 20.0, "ppl_pruned": 25.0}},
        },
        "tasks": {"bar count": {"samples": 5, "kind": "image", "accuracy_original": 1.0, "accuracy_pruned": 0.8}},
    }
    assert card.add_results(folder, report)
    text = ModelCard.load(folder / "README.md").text
    assert card.NOT_TESTED not in text and "**FAIL** on 12 held-out samples" in text
    assert "| text perplexity: code | 20.00 | 25.00 | x1.250 |" in text
    assert "| bar count: exact match, 5 image questions | 100% | 80% | -20 points |" in text
    assert "agreement with the original 0.875" in text
    assert card.add_results(folder, {**report, "passed": True, "failures": []})
    again = ModelCard.load(folder / "README.md")
    assert "**PASS**" in again.text and "**FAIL**" not in again.text and again.text.count(card.RESULTS_START) == 1
    assert again.data.to_dict() == ModelCard.load(pruned / "README.md").data.to_dict()
    (folder / "README.md").write_text("a card of someone else\n")
    assert not card.add_results(folder, report)
    assert (folder / "README.md").read_text() == "a card of someone else\n"
