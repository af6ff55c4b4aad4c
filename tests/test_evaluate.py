"""Test stage: identity gives perfect agreement; a REAP plan beats a random plan; sabotage fails; report."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from reap_vlm.checkpoint import inspect_checkpoint, plan_prune, write_pruned
from reap_vlm.cli import main
from reap_vlm.degeneration import analyse, distinct_n, garbage_share, longest_repeated_substring, longest_run
from reap_vlm.degeneration import repeated_ngram_ratio as rep
from reap_vlm.evaluate import run
from reap_vlm.tiny import make_tiny

ARGS = ["--device", "cpu", "--dtype", "float32", "--eval-samples", "8", "--max-new-tokens", "10", "--max-seq-len", "96"]


def _prune(src, dst, keep):
    layout = inspect_checkpoint(src)
    write_pruned(
        plan_prune(layout, keep),
        dst,
        provenance={"kept": {f"{k[0]}.{k[1]}": v for k, v in keep.items()}, "source": {"config_sha256": "-"}},
    )
    return dst


def _test(pruned, original, out):
    code = main(
        "test",
        run,
        ["--pruned-model-path", str(pruned), "--original-model-path", str(original), "--output-path", str(out), *ARGS],
    )
    return code, json.loads((out / "report" / "report.json").read_text())


def test_degeneration_detectors():
    assert rep([1, 2, 3, 4] * 5) > 0.8 and rep(list(range(20))) == 0.0
    assert longest_run([5, 5, 5, 5, 1]) == 4 and longest_run([]) == 0
    assert distinct_n("a b a b".split(), 1) == 0.5 and distinct_n("a b c".split(), 2) == 1.0
    assert longest_repeated_substring("abcXabc") == 3
    assert garbage_share("ok\ufffd\x00") == 0.5 and garbage_share("fine text\n") == 0.0
    assert analyse("", [])["degenerate"] == ["empty output"]
    assert any("one-token loop" in r for r in analyse("a a a a a a a a a", [7] * 9)["degenerate"])
    assert analyse("The cat sat on the mat and looked at the dog.", list(range(12)))["degenerate"] == []


def test_keeping_every_expert_is_perfect_agreement(tmp_path):
    src = make_tiny("qwen3_vl_moe", tmp_path / "src")
    pruned = _prune(src, tmp_path / "same", {k: list(range(8)) for k in inspect_checkpoint(src).counts()})
    code, report = _test(pruned, src, tmp_path / "out")
    overall = report["metrics"]["overall"]
    assert code == 0 and report["passed"]
    assert overall["agreement"] == 1.0 and overall["kl"] <= 1e-6
    assert overall["ppl_pruned"] == pytest.approx(overall["ppl_original"], rel=1e-6)
    assert set(report["metrics"]["by_modality"]) == {"image", "text"}
    assert set(report["metrics"]["by_source"]) == {"code", "general", "math", "writing", "vision", "tasks"}
    assert len(report["metrics"]["usage_entropy"]) == 3
    for sample in report["generation"]["samples"]:
        assert sample["answer"] == sample["original_answer"]
        assert {
            "repeat_4gram_ratio",
            "distinct_1",
            "distinct_2",
            "longest_token_run",
            "longest_repeated_substring",
            "garbage_share",
            "degenerate",
        } <= set(sample)
    md = (tmp_path / "out" / "report" / "report.md").read_text()
    assert "PASS" in md and "top-1 agreement" in md and "agreement_by_domain.png" in md
    assert (tmp_path / "out" / "report" / "agreement_by_domain.png").stat().st_size > 1000
    # before -> after: the same numbers on both sides, per text domain and per image task
    domains = report["metrics"]["text_by_source"]
    assert set(domains) == {"code", "general", "math", "writing"}
    assert all(d["ppl_pruned"] == pytest.approx(d["ppl_original"], rel=1e-6) for d in domains.values())
    assert report["tasks"] and all(t["kind"] == "image" for t in report["tasks"].values())
    for entry in report["tasks"].values():
        assert entry["accuracy_pruned"] == entry["accuracy_original"] and entry["drop_points"] == 0
        assert entry["loss_pruned"] == pytest.approx(entry["loss_original"], rel=1e-6) and entry["answer_tokens"] > 0
        assert entry["agreement"] == 1.0
    assert "## Before → after" in md and "text perplexity: code" in md and "loss on answer tokens" in md
    assert 1 <= len(report["examples"]) <= 3
    for ex in report["examples"]:
        assert (tmp_path / "out" / "report" / ex["image"]).stat().st_size > 100
        assert f"![{ex['task']} example]({ex['image']})" in md and ex["reference"] in md
        assert ex["pruned_answer"] == ex["original_answer"]
    assert (tmp_path / "out" / "report" / "before_after.png").stat().st_size > 1000


def test_reap_plan_beats_a_random_plan(tmp_path):
    """Experts with distinct functions: a few carry most of the output, the rest are near zero."""
    from reap_vlm.reap import score
    from reap_vlm.settings import ReapSettings, load

    src = make_tiny("qwen3_moe", tmp_path / "src")
    from safetensors.torch import load_file, save_file

    # make the experts' importance unmistakable: experts 1, 3, 4, 6 of every layer are rarely routed and
    # near-silent; experts 0, 2, 5, 7 do the work
    for shard in src.glob("model-*.safetensors"):
        tensors = load_file(str(shard))
        for name in tensors:
            if any(f".experts.{j}.down_proj" in name for j in (1, 3, 4, 6)):
                tensors[name] = tensors[name] * 0.01
            if any(f".experts.{j}.down_proj" in name for j in (0, 2, 5, 7)):
                tensors[name] = tensors[name] * 4.0
            if name.endswith("mlp.gate.weight"):
                w = tensors[name].clone()
                w[[1, 3, 4, 6]] *= 0.1
                tensors[name] = w
        save_file(tensors, str(shard), metadata={"format": "pt"})
    settings = load(
        ReapSettings,
        [
            "--model-path",
            str(src),
            "--output-path",
            str(tmp_path / "meta"),
            "--device",
            "cpu",
            "--scoring-mode",
            "routed",
            "--criterion",
            "reap",
            "--max-samples",
            "16",
            "--max-seq-len",
            "96",
            "--eval-samples",
            "0",
            "--no-plots",
        ],
        {},
    )
    meta = score(settings)
    reap_keep = {(b["layer"], b["expert_set"]): meta["layers"][b["key"]]["kept"] for b in meta["model"]["blocks"]}
    rng = np.random.default_rng(1)
    random_keep = {k: sorted(rng.choice(8, 4, replace=False).tolist()) for k in reap_keep}
    assert all(v == [0, 2, 5, 7] for v in reap_keep.values())  # REAP finds the experts that do the work
    assert random_keep != reap_keep
    _, with_reap = _test(_prune(src, tmp_path / "reap", reap_keep), src, tmp_path / "r1")
    _, with_random = _test(_prune(src, tmp_path / "random", random_keep), src, tmp_path / "r2")
    a, b = with_reap["metrics"]["overall"], with_random["metrics"]["overall"]
    assert a["agreement"] > b["agreement"] and a["kl"] < b["kl"]
    assert a["agreement"] < 1.0 and a["kl"] > 0


@pytest.mark.parametrize("sabotage", ["router", "lm_head"])
def test_sabotaged_models_fail(tmp_path, sabotage):
    src = make_tiny("qwen3_moe", tmp_path / "src")
    broken = tmp_path / "broken"
    shutil.copytree(src, broken)
    from safetensors.torch import load_file, save_file

    for shard in broken.glob("model-*.safetensors"):
        tensors = load_file(str(shard))
        for name in tensors:
            if sabotage == "router" and name.endswith("mlp.gate.weight"):
                w = torch.zeros_like(tensors[name])
                w[0] = 50.0  # every token to expert 0 (and one arbitrary other) ...
                tensors[name] = w
            if sabotage == "router" and ".experts.0.down_proj" in name:
                tensors[name] = tensors[name] * 200  # ... which then drowns out everything else
            if sabotage == "lm_head" and name == "lm_head.weight":
                w = torch.zeros_like(tensors[name])
                w[42] = 1.0  # every logit but one is zero: output collapses to token 42
                tensors[name] = w * 100
        save_file(tensors, str(shard), metadata={"format": "pt"})
    code, report = _test(broken, src, tmp_path / "out")
    assert code == 1 and not report["passed"] and report["failures"]
    if sabotage == "lm_head":  # every generation is flagged; the original's need not be (random weights)
        assert report["generation"]["pruned_degenerate_share"] == 1.0
        assert report["generation"]["newly_degenerate_share"] > 0
        free = [g for g in report["generation"]["samples"] if "reference" not in g]
        assert free and all("one-token loop" in " ".join(g["degenerate"]) for g in free)


def test_missing_pruned_model_is_a_usage_error(tmp_path, capsys):
    code = main("test", run, ["--pruned-model-path", str(tmp_path / "nope"), *ARGS])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "outputs").exists()


def _report(tasks: dict) -> dict:
    return {
        "original": "orig",
        "metrics": {"overall": {"tokens": 0}, "text_by_source": {}},
        "tasks": tasks,
        "generation": {"newly_degenerate_share": None, "pruned_degenerate_share": None},
    }


def test_verdict_names_each_task_whose_accuracy_dropped():
    from reap_vlm.evaluate import verdict
    from reap_vlm.settings import TestSettings

    def task(before, after, n=10):
        return {
            "kind": "image",
            "samples": n,
            "accuracy_original": before,
            "accuracy_pruned": after,
            "drop_points": 100 * (before - after),
        }

    tasks = {"chart": task(1.0, 0.8), "count": task(0.9, 0.8), "ocr": task(0.3, 0.6)}
    failures = verdict(_report(tasks), TestSettings())
    assert failures == [
        "image task chart: exact-match accuracy 100% -> 80% of 10 (-20 points) > REAP_MAX_ACCURACY_DROP 15"
    ]
    assert verdict(_report(tasks), TestSettings(max_accuracy_drop=5.0))[1].startswith("image task count")
    assert verdict(_report(tasks), TestSettings(max_accuracy_drop=20.0)) == []


@pytest.mark.parametrize("value", ["nan", "-1", "150", "inf"])
def test_accuracy_drop_setting_is_checked(tmp_path, capsys, value):
    code = main("test", run, ["--pruned-model-path", str(tmp_path), "--max-accuracy-drop", value, *ARGS])
    err = capsys.readouterr().err
    assert code == 2 and "REAP_MAX_ACCURACY_DROP must be a number of percentage points within [0, 100]" in err
    assert len(err.strip().splitlines()) == 1


def test_batched_generation_equals_one_prompt_at_a_time(tiny_vl_dir):
    from reap_vlm.evaluate import generate, heldout
    from reap_vlm.loading import load_model
    from reap_vlm.settings import TestSettings

    model, processor, _ = load_model(tiny_vl_dir, device="cpu", dtype="float32")
    one, four = TestSettings(eval_data="tasks:6,code:3", batch_size=1), TestSettings(eval_data="tasks:6,code:3")
    samples = heldout(one)
    assert {s.kind for s in samples} == {"image", "text"} and four.batch_size == 4
    alone, batched = generate(model, processor, samples, 12, one), generate(model, processor, samples, 12, four)
    assert [g["sample"] for g in batched] == [s.id for s in samples]
    assert batched == alone


@pytest.mark.parametrize("eval_data", ["builtin", "tasks:70,general:3,code:3,math:3,writing:3"])
def test_held_out_data_excludes_what_chose_the_plan(eval_data):
    """The test stage's built-in held-out samples share nothing with the reap stage's plan-selection slice (the
    data `auto` chose the plan on) nor with its calibration samples, for the defaults and the demo's mix."""
    from reap_vlm.calibration import load_samples, read_source
    from reap_vlm.candidates import heldout_samples
    from reap_vlm.evaluate import heldout
    from reap_vlm.settings import ReapSettings, TestSettings

    reap = ReapSettings(eval_samples=10_000)  # the largest slice the selection portion gives
    chose = heldout_samples(reap)
    scored = load_samples(reap.calibration, "calibration", max_samples=reap.max_samples, seed=reap.seed)
    tested = heldout(TestSettings(eval_data=eval_data, eval_samples=10_000))
    assert chose and scored and tested
    assert {s.kind for s in chose} == {s.kind for s in tested} == {"image", "text"}
    assert not {s.id for s in tested} & ({s.id for s in chose} | {s.id for s in scored})
    # and the two portions of the evaluation split together are all of it: nothing held out is lost
    for name in ("tasks", "code"):
        portions = [s.id for split in ("selection", "test") for s in read_source(name, split)]
        assert sorted(portions) == sorted(s.id for s in read_source(name, "evaluation"))
