"""The test stage streamed (REAP_EXECUTION=stream): the held-out comparison of pruned vs original with both
models read one decoder layer at a time from their own shards gives the in-memory report; the pre-layer
parts run once only when their bytes are verified identical; generation offloaded on a few prompts gives
the in-memory answers, or is skipped with a note and a teacher-forced verdict."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_stream import _close

from reap_vlm import tiny
from reap_vlm.checkpoint import inspect_checkpoint, plan_prune, write_pruned
from reap_vlm.cli import main
from reap_vlm.evaluate import run
from reap_vlm.execution.stream import STREAMABLE
from reap_vlm.execution.weights import OUTER

ARGS = ["--device", "cpu", "--dtype", "float32", "--eval-samples", "8", "--max-new-tokens", "6", "--max-seq-len", "96"]


def _prune(src: Path, dst: Path, drop: set[int]) -> Path:
    layout = inspect_checkpoint(src)
    keep = {k: [j for j in range(n) if j not in drop] for k, n in layout.counts().items()}
    provenance = {"kept": {f"{k[0]}.{k[1]}": v for k, v in keep.items()}, "source": {"config_sha256": "-"}}
    write_pruned(plan_prune(layout, keep), dst, provenance=provenance)
    return dst


def _test(pruned: Path, original: Path, out: Path, *extra: str) -> tuple[int, dict]:
    argv = ["--pruned-model-path", str(pruned), "--original-model-path", str(original), "--output-path", str(out)]
    code = main("test", run, [*argv, *ARGS, *extra])
    return code, json.loads((out / "report" / "report.json").read_text())


def _model(family: str, root: Path) -> tuple[Path, Path]:
    """(original, pruned) tiny checkpoints; the pruned keeps 6 of 8 experts (one removed per routing group)."""
    if family == "deepseek_v3":  # a dense first layer, two routing groups
        with pytest.MonkeyPatch.context() as patch:
            patch.setitem(tiny.TEXT_FAMILIES, family, {**tiny.TEXT_FAMILIES[family], "first_k_dense_replace": 1})
            src = tiny.make_tiny(family, root / family, num_layers=3)
        assert json.loads((src / "config.json").read_text())["first_k_dense_replace"] == 1
    else:
        src = tiny.make_tiny(family, root / family)
    if family == "gpt_oss":  # same weights, two mask types (the tiny model's layers are all sliding)
        config = json.loads((src / "config.json").read_text())
        n = len(config["layer_types"])
        config["layer_types"] = ["sliding_attention", "full_attention"] * (n // 2) + ["sliding_attention"] * (n % 2)
        (src / "config.json").write_text(json.dumps(config))
    return src, _prune(src, root / "pruned", {3, 7})


def _same_report(memory: dict, streamed: dict) -> None:
    assert memory["execution"]["mode"] == "memory" and streamed["execution"]["mode"] == "stream"
    a = {k: v for k, v in memory.items() if k != "execution"}
    b = {k: v for k, v in streamed.items() if k != "execution"}
    _close(a, b)


@pytest.mark.parametrize(
    "family",
    ["qwen3_vl_moe", "deepseek_v3", "gpt_oss"],
    ids=["qwen3_vl_moe-images-deepstack", "deepseek_v3-dense-first-layer", "gpt_oss-sliding-layers"],
)
def test_streamed_test_stage_gives_the_in_memory_report(family, tmp_path, one_pass):
    """Every metric of the report (per text domain perplexity, per task teacher-forced exact match and answer
    loss, agreement, KL, usage entropy) within 1e-5 of the in-memory stage's, the verdict and the generations
    (in memory for both) identical; each model's layers read once, never more than two resident; the pruned
    model's pre-layer parts not read at all, as their bytes are the original's."""
    src, pruned = _model(family, tmp_path)
    # transformers 5.x: batched generate() of the tiny deepseek_v3 fails in memory (a size mismatch in its
    # attention, batch 2 and above): generation is skipped in both runs there, the comparison is the subject
    generation = "skip" if family == "deepseek_v3" else "memory"
    code_m, memory = _test(pruned, src, tmp_path / "memory", "--execution", "memory", "--generation", generation)
    code_s, streamed = _test(pruned, src, tmp_path / "stream", "--execution", "stream", "--generation", generation)
    assert code_m == code_s
    _same_report(memory, streamed)
    if family == "qwen3_vl_moe":  # (a text model leaves the image questions out)
        assert memory["metrics"]["by_modality"]["image"]["tokens"] > 0
        assert any(t["kind"] == "image" and t["answer_tokens"] for t in memory["tasks"].values())
    assert len(memory["metrics"]["text_by_source"]) >= 3
    execution = streamed["execution"]
    assert execution["pre_layer_parts"]["run_once"] is True
    assert "have the same sha256 in both checkpoints" in execution["pre_layer_parts"]["why"]
    original, model = one_pass  # closed in this order: the original, then the pruned model
    assert original.model.config.to_dict() != model.model.config.to_dict()  # each built from its own config
    for driver, outer_read in ((original, True), (model, False)):
        reader = driver.reader
        assert reader.peak_resident == 2 and reader.resident == set()  # current + prefetched, at most
        layer_tensors = [n for group, names in reader.groups.items() if group != OUTER for n in names]
        assert all(reader.reads[p] == 1 for n in layer_tensors for p in reader.parts[n])  # each layer once
        assert all(reader.reads[p] == int(outer_read) for n in reader.groups[OUTER] for p in reader.parts[n])
    for name, entry in execution["models"].items():
        assert entry["peak_resident_layers"] == 2 and entry["decoder_layers"] == len(original.layers), name
    assert (tmp_path / "stream" / "report" / "report.md").read_text().count("- execution: stream") == 1
    assert not [p.name for p in (tmp_path / "stream").iterdir() if p.name.startswith(".reap_")]  # spill removed


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(set(STREAMABLE) - {"qwen3_vl_moe", "deepseek_v3", "gpt_oss"}))
def test_every_streamable_family_gives_the_in_memory_report(family, tmp_path):
    """The other streamable families (generation skipped: the comparison is the subject)."""
    src = tiny.make_tiny(family, tmp_path / family)
    pruned = _prune(src, tmp_path / "pruned", {3, 7})
    skip = ("--generation", "skip")
    _, memory = _test(pruned, src, tmp_path / "memory", "--execution", "memory", *skip)
    _, streamed = _test(pruned, src, tmp_path / "stream", "--execution", "stream", *skip)
    _same_report(memory, streamed)
    assert streamed["execution"]["pre_layer_parts"]["run_once"] is True


def test_pre_layer_parts_differing_in_one_byte_are_run_per_model(tiny_vl_dir, tmp_path, one_pass):
    """The pruned checkpoint's embedding changed by one value: the hashes differ, each model reads and runs
    its own pre-layer parts and head, and the report still equals the in-memory one (generation skipped in
    both: per-task exact match judged teacher-forced)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    pruned = _prune(tiny_vl_dir, tmp_path / "pruned", {1, 4})
    layout = inspect_checkpoint(pruned)
    name = next(n for n in layout.tensors if n.endswith("embed_tokens.weight"))
    shard = pruned / layout.tensors[name].shard
    with safe_open(str(shard), framework="pt") as f:
        tensors, meta = {n: f.get_tensor(n) for n in f.keys()}, f.metadata()
    tensors[name][5, 0] += 0.5
    save_file(tensors, str(shard), metadata=meta)
    _, memory = _test(pruned, tiny_vl_dir, tmp_path / "memory", "--execution", "memory", "--generation", "skip")
    _, streamed = _test(pruned, tiny_vl_dir, tmp_path / "stream", "--execution", "stream", "--generation", "skip")
    _same_report(memory, streamed)
    shared = streamed["execution"]["pre_layer_parts"]
    assert shared == {"run_once": False, "why": f"{name} has other bytes (sha256)"}
    original, model = one_pass
    for driver in (original, model):
        assert set(driver.reader.reads.values()) == {1}  # outer parts and layers, each model its own, once
        assert driver.reader.peak_resident == 2
    md = (tmp_path / "stream" / "report" / "report.md").read_text()
    assert "each model's own: " + shared["why"] in md


def test_offloaded_generation_gives_the_in_memory_answers_on_a_few_prompts(tiny_vl_dir, tmp_path, monkeypatch):
    """auto streams nothing on a CPU; REAP_GENERATION=offload with no RAM for weights (REAP_STREAM_CACHE_GB=0:
    every weight read from accelerate's disk offload) generates REAP_OFFLOAD_PROMPTS prompts, text and image,
    and their answers are the in-memory stage's; per-task exact match is judged teacher-forced; the offload
    folders are removed."""
    pruned = _prune(tiny_vl_dir, tmp_path / "pruned", {0, 5})
    _, memory = _test(pruned, tiny_vl_dir, tmp_path / "memory")
    assert memory["execution"]["mode"] == "memory" and memory["generation"]["mode"] == "memory"
    from reap_vlm import evaluate

    placed, load = [], evaluate.load_model

    def recorded(*args, **kwargs):
        out = load(*args, **kwargs)
        placed.append(getattr(out[0], "hf_device_map", None))
        return out

    monkeypatch.setattr(evaluate, "load_model", recorded)
    few = ["--execution", "stream", "--generation", "offload", "--offload-prompts", "5", "--stream-cache-gb", "0"]
    code, offload = _test(pruned, tiny_vl_dir, tmp_path / "offload", *few)
    assert placed == [{"": "disk"}, {"": "disk"}]  # each model offloaded whole, one after the other
    gen = offload["generation"]
    assert gen["mode"] == "offload" and gen["scope"] == "some" and gen["prompts"] == len(gen["samples"]) == 5
    assert {g["kind"] for g in gen["samples"]} == {"image", "text"}
    assert len({g.get("task") or g["source"] for g in gen["samples"]}) == 5  # spread over tasks and sources
    in_memory = {g["sample"]: g for g in memory["generation"]["samples"]}
    for g in gen["samples"]:
        assert g == in_memory[g["sample"]]  # answers, original's answers, flags, exact match
    assert "on 5 of 8 held-out prompts" in gen["note"] and "teacher-forced" in gen["note"]
    _close(memory["metrics"], offload["metrics"])
    for task, entry in offload["tasks"].items():  # no greedy accuracy from 5 prompts; the teacher-forced one
        assert "accuracy_pruned" not in entry and "teacher_forced_accuracy_pruned" in entry, task
    assert offload["generation"]["accuracy_by_task"]
    md = (tmp_path / "offload" / "report" / "report.md").read_text()
    assert "teacher-forced exact match," in md and "accelerate's offload" in md
    assert "; teacher-forced exact match (every answer token the model's top-1) and the loss" in md
    assert code in (0, 1) and not [p for p in (tmp_path / "offload").iterdir() if p.name.startswith(".reap_")]


def test_offloaded_prompts_alternate_image_and_text_groups():
    from types import SimpleNamespace

    from reap_vlm.evaluate import spread

    def sample(i, source, image=False, task=""):
        return SimpleNamespace(id=str(i), source=source, images=[1] if image else [], answer=task, task=task)

    samples = [sample(0, "code"), sample(1, "code"), sample(2, "math"), sample(3, "tasks", True, "count")]
    samples += [sample(4, "tasks", True, "chart"), sample(5, "tasks", True, "count")]
    assert [s.id for s in spread(samples, 2)] == ["0", "3"]  # an image task and a text source
    assert [s.id for s in spread(samples, 4)] == ["0", "2", "3", "4"]  # every group once
    assert [s.id for s in spread(samples, 5)] == ["0", "2", "3", "4", "5"]  # then the first group's next
    assert spread(samples, 10) == samples and spread([], 3) == []


def test_skipped_generation_is_noted_and_the_verdict_is_teacher_forced():
    from reap_vlm.evaluate import GENERATION_NOTES, _markdown, verdict
    from reap_vlm.settings import TestSettings

    task = {
        "kind": "image",
        "samples": 10,
        "answer_tokens": 20,
        "loss_pruned": 1.0,
        "loss_original": 0.5,
        "teacher_forced_accuracy_original": 0.8,
        "teacher_forced_accuracy_pruned": 0.6,
    }
    note = GENERATION_NOTES["skip"]
    generation = {"mode": "skip", "scope": "none", "prompts": 0, "note": note, "samples": []}
    generation |= {"pruned_degenerate_share": None, "original_degenerate_share": None, "newly_degenerate_share": None}
    overall = {"tokens": 0}
    report = {
        "original": "o",
        "pruned": "p",
        "samples": 10,
        "metrics": {"overall": overall, "by_source": {}, "by_modality": {}, "usage_entropy": {}},
        "tasks": {"chart": task},
        "generation": generation,
        "failures": [],
        "passed": True,
    }
    assert verdict(report, TestSettings()) == [
        "image task chart: teacher-forced exact match 80% -> 60% of 10 (-20 points) > REAP_MAX_ACCURACY_DROP 15"
    ]
    assert verdict(report, TestSettings(max_accuracy_drop=25.0)) == []
    md = _markdown(report, [])
    assert "Generation skipped (REAP_GENERATION=skip): the verdict rests on the teacher-forced metrics" in md
    assert "| chart: teacher-forced exact match, 10 image questions | 80% | 60% | -20 points |" in md


def test_auto_streams_the_comparison_only_when_the_models_do_not_fit(tiny_vl_dir, tmp_path):
    from reap_vlm.evaluate import choose_execution, generation_mode, memory_need
    from reap_vlm.settings import TestSettings, load

    pruned = _prune(tiny_vl_dir, tmp_path / "pruned", {2, 6})
    settings = load(TestSettings, ["--pruned-model-path", str(pruned), "--original-model-path", str(tiny_vl_dir)], {})
    assert settings.execution == "auto" and settings.generation == "auto"
    assert choose_execution(settings, pruned, tiny_vl_dir).mode == "memory"  # no GPU in use
    settings.device = "cuda"
    need = memory_need(pruned, tiny_vl_dir, settings)
    weights = sum(t.nbytes for d in (pruned, tiny_vl_dir) for t in inspect_checkpoint(d).tensors.values())
    assert need > weights + 2**30
    small = choose_execution(settings, pruned, tiny_vl_dir, gpu_free=[need - 1])
    large = choose_execution(settings, pruned, tiny_vl_dir, gpu_free=[need])
    assert small.mode == "stream" and "do not fit" in small.reason and "the pruned and the original" in small.reason
    assert large.mode == "memory" and " fit " in large.reason
    two = choose_execution(settings, pruned, tiny_vl_dir, gpu_free=[need - 1, need - 1])  # one GPU must hold it
    assert two.mode == "stream" and "largest of the 2 visible GPUs" in two.reason
    assert (generation_mode(settings, small), generation_mode(settings, large)) == ("offload", "memory")
    settings.generation = "skip"
    assert generation_mode(settings, small) == generation_mode(settings, large) == "skip"


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--execution", "streamed", "--execution='streamed' is not a valid choice"),
        ("--generation", "none", "--generation='none' is not a valid choice"),
        ("--offload-prompts", "0", "REAP_OFFLOAD_PROMPTS=0 is out of range"),
        ("--stream-cache-gb", "-1", "REAP_STREAM_CACHE_GB must be >= 0"),
        ("--stream-cache-gb", "nan", "REAP_STREAM_CACHE_GB must be >= 0"),
    ],
)
def test_bad_streaming_settings_are_one_line_and_exit_2(flag, value, message, tiny_vl_dir, tmp_path, capsys):
    argv = ["--pruned-model-path", str(tiny_vl_dir), "--output-path", str(tmp_path / "out"), flag, value]
    code = main("test", run, argv)
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_family_streaming_does_not_support_is_refused_before_loading(tiny_text_dir, tmp_path, capsys, monkeypatch):
    from reap_vlm.execution import stream

    monkeypatch.delitem(stream.STREAMABLE, "qwen3_moe")
    loaded = []
    monkeypatch.setattr("reap_vlm.evaluate.load_model", lambda *a, **k: loaded.append(a))
    argv = ["--pruned-model-path", str(tiny_text_dir), "--original-model-path", str(tiny_text_dir)]
    code = main("test", run, [*argv, "--output-path", str(tmp_path / "out"), "--execution", "stream", *ARGS])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "REAP_EXECUTION=stream does not support qwen3_moe yet" in err[0]
    assert loaded == [] and not (tmp_path / "out" / "report").exists()


def test_token_metrics_with_two_heads_equal_full_logits():
    """The streamed comparison's logits, a chunk at a time from each model's own head, give the sums of full
    logits (the path for pre-layer parts that differ)."""
    from reap_vlm.candidates import _token_metrics

    g = torch.Generator().manual_seed(0)
    ref_w, w = torch.randn(50, 8, generator=g), torch.randn(50, 8, generator=g)
    ref_h, h = torch.randn(2, 7, 8, generator=g), torch.randn(2, 7, 8, generator=g)
    ids = torch.randint(0, 50, (2, 7), generator=g)
    modality = torch.zeros(2, 7, dtype=torch.long)
    full = _token_metrics(ref_h @ ref_w.T, h @ w.T, ids, modality)
    chunked = _token_metrics(
        ref_h, h, ids, modality, None, lambda x: x @ w.T, chunk_bytes=1, ref_head=lambda x: x @ ref_w.T
    )
    for key, value in full.items():
        assert torch.allclose(value, chunked[key], rtol=1e-6, atol=1e-9), key


def test_spilled_comparison_equals_in_memory_and_stdout_is_the_json_line(tiny_vl_dir, tmp_path, capsys, monkeypatch):
    """No RAM for hidden states (the machine's available memory taken as 0): every state spills to disk, the
    numbers are the in-memory ones, the spill folder is removed, and the note goes to stderr while stdout holds
    only the --json result line."""
    from reap_vlm.execution import stream

    pruned = _prune(tiny_vl_dir, tmp_path / "pruned", {2, 5})
    _, memory = _test(pruned, tiny_vl_dir, tmp_path / "memory", "--execution", "memory", "--generation", "skip")
    capsys.readouterr()
    monkeypatch.setattr(stream, "_available_ram", lambda: 0)
    extra = ("--execution", "stream", "--generation", "skip", "--json")
    _, streamed = _test(pruned, tiny_vl_dir, tmp_path / "stream", *extra)
    out, err = capsys.readouterr()
    line = json.loads(out)
    assert len(out.strip().splitlines()) == 1 and line["verdict"] in ("pass", "fail")
    assert (line["execution"], line["generation"]) == ("stream", "skip")
    assert "keeps 0.0 GiB of hidden states in RAM" in err
    assert streamed["execution"]["memory"]["spilled_writes"] > 0
    assert streamed["execution"]["memory"]["ram_cache_peak_gib"] == 0
    _same_report(memory, streamed)
    assert not [p.name for p in (tmp_path / "stream").iterdir() if p.name.startswith(".reap_")]
