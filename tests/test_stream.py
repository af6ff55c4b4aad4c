"""Streamed execution (reap_vlm.execution): the layer-by-layer pass from the shards gives the same
reap_metadata.json as the whole model in memory, reads each layer's tensors once with at most two
layers resident, and spills hidden states to disk without changing a number."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reap_vlm import tiny
from reap_vlm.calibration import load_samples, make_batches
from reap_vlm.errors import SettingsError, UnsupportedModelError
from reap_vlm.execution import choose
from reap_vlm.execution.memory import forward
from reap_vlm.execution.stream import STREAMABLE, StreamedModel, check_streamable, observe
from reap_vlm.execution.weights import OUTER
from reap_vlm.loading import load_model
from reap_vlm.moe import find_moe_blocks
from reap_vlm.observe import Observer
from reap_vlm.settings import ReapSettings, load

PIXELS = dict(min_pixels=1024, max_pixels=16384)
RTOL = 1e-5


def _settings(model_dir: Path, out: Path, **extra) -> ReapSettings:
    argv = ["--model-path", str(model_dir), "--output-path", str(out), "--device", "cpu", "--max-samples", "9"]
    argv += ["--max-seq-len", "96", "--batch-size", "3", "--eval-samples", "0", "--no-plots"]
    argv += ["--min-pixels", "1024", "--max-pixels", "16384"]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return load(ReapSettings, argv, {})


def _close(a, b, path: str = "") -> None:
    """Every number of `b` within RTOL (relative) of `a`; everything else identical."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            assert math.isnan(a) and math.isnan(b), path
        elif math.isinf(a) or math.isinf(b):
            assert a == b, f"{path}: {a} vs {b}"  # an expert never routed: -inf on both sides
        else:
            assert abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-30), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def _untimed(table: dict) -> dict:
    table = json.loads(json.dumps(table))
    for key in ("seconds", "greedy_seconds", "merge_seconds"):
        table.pop(key, None)
    for row in table.get("rows", []):
        row.get("search", {}).pop("seconds", None)
    return table


def _same_metadata(memory: dict, streamed: dict) -> None:
    assert memory["scoring"]["execution"]["mode"] == "memory"
    assert streamed["scoring"]["execution"]["mode"] == "stream"
    _close(memory["layers"], streamed["layers"])  # raw sums, scores, kept, protected
    assert memory["plan"] == streamed["plan"]
    assert ("candidates" in memory) == ("candidates" in streamed)
    if "candidates" in memory:  # every candidate's loss, KL, agreement, entropy, floor; the choice
        _close(_untimed(memory["candidates"]), _untimed(streamed["candidates"]))
    assert memory["calibration"] == streamed["calibration"]
    assert memory["model"] == streamed["model"]


def _read_once(streamed, passes: int = 1) -> None:
    """Every decoder layer's tensors read once per pass over the weights (the outer parts once), never more
    than two decoder layers' weights resident."""
    reader = streamed.reader
    assert sorted(reader.reads) == sorted(reader.layout.tensors)
    outer = set(reader.groups[OUTER])
    assert {reader.reads[n] for n in outer} == {1}
    assert {reader.reads[n] for n in reader.layout.tensors if n not in outer} == {passes}
    assert reader.peak_resident == 2 and reader.resident == set()
    assert streamed.extra_passes == passes - 1


def _family_dir(family: str, root: Path, tiny_vl_dir: Path, tiny_text_dir: Path, monkeypatch) -> Path:
    """The tiny checkpoint of `family`, with what its streamed replay must get right: DeepSeek-V3 with a dense
    first layer (and its 2 expert groups), gpt-oss with a sliding and a full attention layer."""
    if family == "qwen3_vl_moe":
        return tiny_vl_dir
    if family == "qwen3_moe":
        return tiny_text_dir
    if family == "deepseek_v3":
        monkeypatch.setitem(
            tiny.TEXT_FAMILIES, "deepseek_v3", {**tiny.TEXT_FAMILIES["deepseek_v3"], "first_k_dense_replace": 1}
        )
        model_dir = tiny.make_tiny("deepseek_v3", root / family, num_layers=3)
        config = json.loads((model_dir / "config.json").read_text())
        assert config["first_k_dense_replace"] == 1 and config["n_group"] == 2
        return model_dir
    model_dir = tiny.make_tiny(family, root / family)
    if family == "gpt_oss":
        config = json.loads((model_dir / "config.json").read_text())
        config["layer_types"] = ["sliding_attention", "full_attention"]  # same weights, two mask types
        (model_dir / "config.json").write_text(json.dumps(config))
    return model_dir


VISION = ("qwen3_vl_moe", "ernie4_5_vl_moe", "glm4v_moe", "aria", "minimax_m3_vl")  # tiny models with images
ALL_CANDIDATES = dict(eval_samples=4)  # REAP_CRITERION=auto: every criterion x policy x ratio, random, greedy
STAGE_RUNS = [
    pytest.param("qwen3_vl_moe", "image+text", ALL_CANDIDATES, id="qwen3_vl_moe-image+text-all-candidates"),
    pytest.param("qwen3_moe", "text", dict(eval_samples=3, eval_ratios="0.5", criterion="reap"), id="qwen3_moe-text"),
    pytest.param("qwen3_vl_moe", "text", ALL_CANDIDATES, id="qwen3_vl_moe-text", marks=pytest.mark.slow),
    pytest.param("qwen3_moe", "text", ALL_CANDIDATES, id="qwen3_moe-text-all-candidates", marks=pytest.mark.slow),
    *[
        pytest.param(
            family,
            "image+text" if family in VISION else "text",
            ALL_CANDIDATES,
            id=f"{family}-{'image+text' if family in VISION else 'text'}",
            marks=pytest.mark.slow,
        )
        for family in sorted(STREAMABLE)
        if family not in ("qwen3_vl_moe", "qwen3_moe")
    ],
]


def test_every_streamable_family_is_in_the_stage_comparison():
    assert {p.values[0] for p in STAGE_RUNS} == set(STREAMABLE)


@pytest.mark.parametrize("family, batches, run", STAGE_RUNS)
def test_streamed_stage_writes_the_same_metadata_as_in_memory(
    family, batches, run, tiny_vl_dir, tiny_text_dir, tmp_path, one_pass, monkeypatch
):
    """Statistics in one pass over the weights, every candidate plan of that pass measured in it, the greedy
    search in one more pass per step (and one for its plan): the same metadata as in memory, raw sums, plans,
    candidate table (greedy row included) and merge statistics."""
    from reap_vlm.reap import score

    model_dir = _family_dir(family, tmp_path / "models", tiny_vl_dir, tiny_text_dir, monkeypatch)
    calibration = "code:3,writing:2,vision:4" if batches == "image+text" else "code:5,writing:4"
    run = dict(calibration=calibration, **run)  # the default searches: greedy, then the swap search
    memory = score(_settings(model_dir, tmp_path / "memory", execution="memory", **run))
    streamed = score(_settings(model_dir, tmp_path / "stream", execution="stream", **run))
    _same_metadata(memory, streamed)
    passes = streamed["scoring"]["execution"]["passes"]
    (driver,) = one_pass
    _read_once(driver, passes)
    rows = memory["candidates"]["rows"]
    greedy = [r for r in rows if r["policy"] == "greedy"]
    if "merge_stats" in memory:  # REAP_EVAL_MERGE (default): the merge row, measured in the statistics' pass too
        merge_rows = [r for r in rows if r["policy"] == "merge"]
        assert merge_rows or any(n.startswith("merge at ratio") for n in memory["candidates"]["notes"])
        # the GPU reserve leaves room for the float32 alignment features of a block's experts (merge._features)
        mem = streamed["scoring"]["execution"]["memory"]
        assert (
            mem["merge_features_gib"] > 0 and mem["reserve_gib"] >= mem["largest_layer_gib"] + mem["merge_features_gib"]
        )
    if run.get("criterion", "auto") == "auto":
        assert len(rows) > 10
        if greedy:  # its steps, the swap search's measurements, their plans unless measured already
            steps = greedy[0]["search"]["added_per_block"]
            swap = [r for r in rows if r["policy"] == "swap"]
            assert passes >= 1 + steps + (1 if swap else 0)  # one when the whole space fits its budget
            assert f"the greedy search takes {steps} step(s)" in streamed["scoring"]["execution"]["notes"][0]
        else:
            assert family == "deepseek_v3" and passes == 1  # no greedy search with expert groups (a note says so)
            assert any("greedy" in n and "group-limited" in n for n in memory["candidates"]["notes"])
    else:
        assert passes == 1 and not greedy
        assert driver.answered == memory["candidates"]["plans_evaluated"]  # every plan from the one pass
    if batches == "image+text":
        assert memory["calibration"]["tokens"]["image"] > 0
    else:
        assert memory["calibration"]["tokens"]["image"] == 0
    from reap_vlm.metadata import _clean  # what the file holds: JSON has no inf (a never-routed expert's mean)

    assert json.loads((tmp_path / "stream" / "reap_metadata.json").read_text())["layers"] == _clean(streamed["layers"])
    # the merge statistics: every sum the same; the sampled activations a draw of the same size
    from reap_vlm.observe import merge_stats

    def made(info: dict) -> dict:
        return {k: v for k, v in info.items() if k != "created"}  # each run's own timestamp

    if "merge_stats" not in memory:
        assert "merge_stats" not in streamed
        return
    assert made(memory["merge_stats"]) == made(streamed["merge_stats"])
    (a, info_a), (b, info_b) = (merge_stats.read(tmp_path / m / merge_stats.FILE_NAME) for m in ("memory", "stream"))
    assert a.keys() == b.keys() and made(info_a) == made(info_b)
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name, t in a[key].items():
            if name == "activations":
                assert t.shape == b[key][name].shape
            else:
                assert torch.allclose(t.double(), b[key][name].double(), rtol=RTOL, atol=0), (key, name)


@pytest.mark.parametrize("family", ["qwen3_vl_moe", pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def test_streamed_plan_measurement_gives_the_same_candidate_table(family, tiny_vl_dir, tiny_text_dir, tmp_path):
    """Held-out rows of the unpruned model and of every plan, one pass over the layers; the same table."""
    from reap_vlm import candidates
    from reap_vlm.reap import score

    model_dir = tiny_vl_dir if family == "qwen3_vl_moe" else tiny_text_dir
    settings = _settings(model_dir, tmp_path, calibration="code:3,vision:3", execution="memory", eval_samples=4)
    settings.eval_samples = 0
    meta = score(settings)  # the statistics the plans are cut from
    settings.eval_samples = 4
    model, processor, _ = load_model(model_dir, device="cpu")
    batches = list(
        make_batches(
            candidates.heldout_samples(settings), processor, answers=True, max_seq_len=96, batch_size=3, **PIXELS
        )
    )
    streamed = StreamedModel(model_dir, device="cpu")
    tables = []
    for driver in (model, streamed):
        blocks = find_moe_blocks(model if driver is model else streamed.model)
        table = candidates.measure_plans(
            driver, blocks, meta, batches, criteria=("reap", "frequency"), ratios=[0.5], random_seeds=(0,)
        )
        tables.append(_untimed({k: v for k, v in table.items() if k != "_rows"}))
    streamed.close()
    assert tables[0]["plans_evaluated"] >= 2 and tables[0]["heldout"]["samples"] > 0
    _close(tables[0], tables[1])


def test_spill_to_disk_gives_identical_metadata_and_removes_its_folder(tiny_vl_dir, tmp_path):
    from reap_vlm.reap import score

    run = dict(calibration="code:3,vision:6", execution="stream", eval_samples=2, eval_ratios="0.5", criterion="reap")
    ram = score(_settings(tiny_vl_dir, tmp_path / "ram", **run))
    disk = score(_settings(tiny_vl_dir, tmp_path / "disk", stream_cache_gb=0, **run))
    assert json.dumps(ram["layers"], sort_keys=True) == json.dumps(disk["layers"], sort_keys=True)
    assert ram["plan"] == disk["plan"]
    assert json.dumps(_untimed(ram["candidates"])) == json.dumps(_untimed(disk["candidates"]))
    assert not [p.name for p in (tmp_path / "disk").iterdir() if p.name.startswith(".")]  # spill folder removed


def test_greedy_search_passes_carry_as_many_plans_as_the_cache_holds(tiny_vl_dir, tmp_path, one_pass):
    """With a hidden-state cache of a few KiB every extra pass carries one plan beside the unpruned model: more
    passes, the same candidate table (greedy row included) as with every plan in one pass per step."""
    from reap_vlm.reap import score

    run = dict(calibration="code:3,vision:4", execution="stream", eval_samples=4, eval_ratios="none", search_budget=0)
    wide = score(_settings(tiny_vl_dir, tmp_path / "wide", **run))
    narrow = score(_settings(tiny_vl_dir, tmp_path / "narrow", stream_cache_gb=2**-20, **run))
    greedy = [r for r in wide["candidates"]["rows"] if r["policy"] == "greedy"]
    assert greedy and greedy[0]["search"]["added_per_block"] == 1
    trials = greedy[0]["search"]["evaluations"] - 1  # the trial plans of its one step (+ the unpruned model)
    assert trials > 2
    _, narrow_driver = one_pass
    assert narrow_driver.plans_per_pass(narrow_driver.measured.batches) == 1
    assert wide["scoring"]["execution"]["passes"] in (3, 2)  # scoring, the step, its plan unless measured
    assert narrow["scoring"]["execution"]["passes"] == wide["scoring"]["execution"]["passes"] - 1 + trials
    assert json.dumps(_untimed(wide["candidates"])) == json.dumps(_untimed(narrow["candidates"]))
    assert wide["plan"] == narrow["plan"]
    _read_once(narrow_driver, narrow["scoring"]["execution"]["passes"])


def test_hidden_cache_spills_above_its_budget(tmp_path):
    from reap_vlm.execution.stream import HiddenCache

    cache = HiddenCache(limit_bytes=4 * 10, spill_parent=tmp_path)
    tensors = {i: torch.randn(2, 5, generator=torch.Generator().manual_seed(i)) for i in range(3)}
    for i, t in tensors.items():
        cache.put(i, t)
    assert cache.spilled_writes == 2 and cache.ram_bytes == 40 and cache.spill_dir.is_dir()
    for i, t in tensors.items():
        assert torch.equal(cache.get(i), t)
    cache.put(0, tensors[2])  # a replaced entry frees its RAM first
    assert torch.equal(cache.get(0), tensors[2]) and cache.ram_bytes == 40
    spill = cache.spill_dir
    cache.close()
    assert not spill.exists() and list(tmp_path.iterdir()) == []


def test_hidden_cache_tiers_device_then_ram_then_disk(tmp_path):
    """The device tier first (here the CPU stands in for the GPU), then RAM, then the spill folder; a key put
    again keeps its RAM buffer."""
    from reap_vlm.execution.stream import HiddenCache

    cache = HiddenCache(limit_bytes=40, spill_parent=tmp_path, gpu_bytes=40, device=torch.device("cpu"))
    tensors = {i: torch.randn(2, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    for i, t in tensors.items():
        cache.put(i, t)
    assert (cache.gpu_bytes, cache.ram_bytes, cache.spilled_writes) == (40, 40, 2)
    assert cache.get(0) is tensors[0]  # the device tier keeps the tensor itself: no copy
    buffer = cache.get(1)
    assert buffer is not tensors[1] and torch.equal(buffer, tensors[1])
    cache.put(1, tensors[3])
    assert cache.get(1) is buffer and torch.equal(buffer, tensors[3])
    for i in (2, 3):
        assert torch.equal(cache.get(i), tensors[i])
    assert cache.spilled_reads == 2
    cache.drop(0)
    assert cache.gpu_bytes == 0 and 0 not in cache
    cache.close()


def test_hidden_cache_promotes_entries_to_its_device_tier_after_the_capture(tmp_path):
    """The capture fills RAM and the spill folder first (the GPU's room is known only once the outer parts
    left it); promote() moves entries to the device tier while they fit, RAM ones first, the numbers unchanged."""
    from reap_vlm.execution.stream import HiddenCache

    cache = HiddenCache(limit_bytes=80, spill_parent=tmp_path)
    tensors = {i: torch.randn(2, 5, generator=torch.Generator().manual_seed(i)) for i in range(4)}
    for i, t in tensors.items():
        cache.put(i, t)
    assert (cache.gpu_bytes, cache.ram_bytes, cache.spilled_writes) == (0, 80, 2)
    cache.promote(80, torch.device("cpu"))  # room for two entries: the RAM ones
    assert (cache.gpu_bytes, cache.ram_bytes, cache.spilled_reads) == (80, 0, 0)
    for i, t in tensors.items():
        assert torch.equal(cache.get(i), t)
    cache.put(0, tensors[3])  # a device entry put again stays on the device
    assert cache.gpu_bytes == 80 and torch.equal(cache.get(0), tensors[3])
    cache.close()
    assert list(tmp_path.iterdir()) == []


def test_loader_reads_each_layer_once_with_at_most_two_layers_resident(tiny_vl_dir):
    streamed = StreamedModel(tiny_vl_dir, device="cpu")
    reader = streamed.reader
    assert reader.unused == []  # every tensor of the checkpoint becomes a parameter
    assert sum(len(v) for v in reader.groups.values()) == len(reader.layout.tensors)
    assert all(reader.groups[i] for i in range(len(streamed.layers)))
    outer = {n: reader.reads[n] for n in reader.groups[OUTER]}
    assert set(outer.values()) == {1}  # the embeddings, vision tower and head: read once, at start
    loaded_at_once: list[int] = []

    def count_loaded(_batch) -> None:
        loaded_at_once.append(sum(not any(p.is_meta for p in layer.parameters()) for layer in streamed.layers))

    from reap_vlm.execution.stream import Stream

    model, processor, _ = load_model(tiny_vl_dir, device="cpu")
    batches = list(
        make_batches(
            load_samples("code:2,vision:2", max_samples=4, seed=0), processor, max_seq_len=64, batch_size=2, **PIXELS
        )
    )
    streamed.run([Stream(batches, before_batch=count_loaded)]).close()
    assert set(loaded_at_once) == {1}  # the layer that computes; the prefetched one is not yet in the model
    assert reader.peak_resident == 2  # current + prefetched
    assert reader.resident == set()
    for name in reader.layout.tensors:
        assert reader.reads[name] == 1, name  # each layer's bytes once per pass, never a whole shard
    assert sum(reader.nbytes(g) for g in reader.groups) == sum(t.nbytes for t in reader.layout.tensors.values())
    streamed.close()
    # the parameters really are the checkpoint's: layer 1 loaded again equals the in-memory model's
    reader.load(1)
    for name, p in streamed.layers[1].named_parameters():
        ref = model.get_parameter(f"{streamed.layers_path}.1.{name}")
        assert torch.equal(p, ref), name
    reader.release(1)
    assert all(p.is_meta for p in streamed.layers[1].parameters())


def test_reader_gives_safetensors_bytes_without_mapping_the_shard(tiny_vl_dir):
    from safetensors import safe_open

    from reap_vlm.checkpoint import inspect_checkpoint
    from reap_vlm.execution.weights import read_tensor

    layout = inspect_checkpoint(tiny_vl_dir)
    for name, info in layout.tensors.items():
        with open(tiny_vl_dir / info.shard, "rb", buffering=0) as f, safe_open(tiny_vl_dir / info.shard, "pt") as st:
            ours, theirs = read_tensor(f, info), st.get_tensor(name)
        assert ours.dtype == theirs.dtype and ours.shape == theirs.shape, name
        assert ours.view(torch.uint8).reshape(-1).tolist() == theirs.view(torch.uint8).reshape(-1).tolist(), name


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory):
    """An olmoe checkpoint of 3 layers wide enough (H 512, 32 experts of I 512: ~0.1 GiB per layer in fp32) that
    a layer more or less in RAM shows in the process' RSS."""
    monkeypatch = pytest.MonkeyPatch()
    wide = {"hidden_size": 512, "intermediate_size": 512, "num_experts": 32, "head_dim": 128}
    monkeypatch.setitem(tiny.TEXT_FAMILIES, "olmoe", wide)
    try:
        return tiny.make_tiny("olmoe", tmp_path_factory.mktemp("wide") / "olmoe", num_layers=3, max_shard_size="1GB")
    finally:
        monkeypatch.undo()


def _child(code: str, *args: str) -> dict:
    """`code` in a fresh interpreter (its own peak RSS), the JSON it prints last."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


READER_RSS = """
import json, sys
from pathlib import Path
from reap_vlm.calibration import load_samples, make_batches
from reap_vlm.execution.stream import Stream, StreamedModel, _rss
streamed = StreamedModel(Path(sys.argv[1]), device="cpu", dtype="float32")
batches = list(make_batches(load_samples("code:4", max_samples=4, seed=0), streamed.processor, max_seq_len=64,
                            batch_size=4))
before = _rss("VmRSS")
streamed.run([Stream(batches)]).close()
print(json.dumps({"before": before, "peak": _rss("VmHWM"), "layer": streamed.layer_bytes(),
                  "cache": streamed.cache_peaks["ram_cache_peak_gib"], "resident": streamed.reader.peak_resident}))
"""


def test_streamed_layer_reads_hold_the_layers_in_rss_that_the_bound_counts(wide_dir):
    """The reader reads a layer into buffers of its own (no mapping of the shard), so the prefetched layer is
    really in memory while the current one computes: the pass' RSS above the process before it is at least
    1.5 layers, and at most the 3 layers of the CPU bound (olmoe stores its experts one by one: while a layer
    is fused at load, its raw tensors, transformers' stacked intermediate and the fused result are alive;
    measured 2.98 layers) plus the cache and one small batch's activations. (safe_open's mapped tensors gave
    about one layer: the prefetch read nothing, the pages came in at compute time.)"""
    got = _child(READER_RSS, str(wide_dir))
    layer, above = got["layer"], got["peak"] - got["before"]
    assert layer > 90 * 2**20 and got["resident"] == 2
    assert 1.5 * layer <= above <= 3 * layer + got["cache"] + 64 * 2**20, (above / layer, got)


STAGE_RSS = """
import json, sys
from reap_vlm.reap import score
from reap_vlm.settings import ReapSettings, load
argv = ["--model-path", sys.argv[1], "--output-path", sys.argv[2], "--device", "cpu", "--execution", "stream",
        "--calibration", "code:4,writing:4", "--max-samples", "8", "--max-seq-len", "64", "--batch-size", "4",
        "--eval-samples", "2", "--no-plots"]
print(json.dumps(score(load(ReapSettings, argv, {}))["scoring"]["execution"]["memory"]))
"""


def test_streamed_cpu_run_stays_within_its_rss_bound(wide_dir, tmp_path):
    """A whole streamed reap stage on the CPU (full mode, merge statistics, candidate plans and the greedy
    search): the process' peak RSS within the bound of docs/design.md ("Memory bounds") that the metadata
    records, and above the process' baseline by at least a layer (the bound's layer terms are needed)."""
    memory = _child(STAGE_RSS, str(wide_dir), str(tmp_path / "out"))
    gib = 2**30
    assert memory["cpu_peak_rss_gib"] <= memory["cpu_bound_gib"], memory
    assert memory["cpu_peak_rss_gib"] >= memory["baseline_rss_gib"] + memory["largest_layer_gib"], memory
    assert memory["merge_stats_gib"] > 0 and memory["largest_layer_gib"] * gib > 90 * 2**20


def _observed(model_dir: Path, spec: str, mode: str = "full") -> tuple[dict, dict]:
    """(in-memory, streamed) Observer exports for the same batches."""
    model, processor, _ = load_model(model_dir, device="cpu")
    batches = list(
        make_batches(load_samples(spec, max_samples=6, seed=0), processor, max_seq_len=80, batch_size=3, **PIXELS)
    )
    blocks = find_moe_blocks(model)
    observer = Observer(model, blocks, mode, 768)
    with observer, torch.inference_mode():
        for batch in batches:
            observer.set_modality(batch.modality)
            forward(model, batch)
    streamed = StreamedModel(model_dir, device="cpu")
    streamed_blocks = find_moe_blocks(streamed.model)
    assert [b.key for b in streamed_blocks] == [b.key for b in blocks]
    got, _ = observe(streamed, streamed_blocks, batches, mode, 768)
    streamed.close()
    return observer.export(), got


def test_deepseek_v3_with_a_dense_first_layer_and_groups(tmp_path, monkeypatch):
    monkeypatch.setitem(
        tiny.TEXT_FAMILIES, "deepseek_v3", {**tiny.TEXT_FAMILIES["deepseek_v3"], "first_k_dense_replace": 1}
    )
    model_dir = tiny.make_tiny("deepseek_v3", tmp_path / "ds", num_layers=3)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["first_k_dense_replace"] == 1 and config["n_group"] == 2
    memory, streamed = _observed(model_dir, "code:3,writing:3")
    assert sorted(memory) == ["1.experts", "2.experts"]
    _close(memory, streamed)


def test_gpt_oss_with_sliding_and_full_attention_layers(tmp_path):
    model_dir = tiny.make_tiny("gpt_oss", tmp_path / "oss")
    config = json.loads((model_dir / "config.json").read_text())
    config["layer_types"] = ["sliding_attention", "full_attention"]  # same weights, two mask types
    (model_dir / "config.json").write_text(json.dumps(config))
    memory, streamed = _observed(model_dir, "code:3,writing:3")  # 80 tokens > the 16-token window
    _close(memory, streamed)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(STREAMABLE))
@pytest.mark.parametrize("mode", ["full", "routed", "router"])
def test_every_streamable_family_observes_the_same_statistics(family, mode, tmp_path):
    model_dir = tiny.make_tiny(family, tmp_path / family)
    vision = "vision_config" in json.loads((model_dir / "config.json").read_text())
    memory, streamed = _observed(model_dir, "code:2,vision:4" if vision else "code:3,writing:3", mode)
    _close(memory, streamed)


def test_unverified_families_and_checkpoints_are_refused_before_loading(tiny_vl_dir, tmp_path):
    from reap_vlm.reap import score

    with pytest.raises(UnsupportedModelError, match="REAP_EXECUTION=stream does not support jamba"):
        check_streamable({"model_type": "jamba"})
    with pytest.raises(UnsupportedModelError, match="does not read bitsandbytes-quantized checkpoints"):
        check_streamable({"model_type": "qwen3_moe", "quantization_config": {"quant_method": "bitsandbytes"}})
    check_streamable({"model_type": "qwen3_moe", "quantization_config": {"quant_method": "fp8"}})  # read
    with pytest.raises(SettingsError, match="no accumulator checkpoints"):
        score(_settings(tiny_vl_dir, tmp_path / "a", execution="stream", checkpoint_every=1))
    with pytest.raises(SettingsError, match="no accumulator checkpoints"):
        score(_settings(tiny_vl_dir, tmp_path / "b", execution="stream", resume=True))
    assert not any(p.exists() for p in (tmp_path / "a", tmp_path / "b"))


def test_auto_streams_only_when_the_model_does_not_fit_the_gpu(tiny_vl_dir, tmp_path):
    settings = _settings(tiny_vl_dir, tmp_path, execution="auto")
    assert choose(settings).mode == "memory"  # no GPU in use
    settings.device = "cuda"
    small, large = choose(settings, gpu_free=[2**20]), choose(settings, gpu_free=[2**40])
    assert small.mode == "stream" and "do not fit the 0.0 GiB free on one GPU" in small.reason
    assert large.mode == "memory" and "and fit the 1024.0 GiB free on one GPU" in large.reason
    settings.execution = "stream"
    assert choose(settings).mode == "stream"


def test_auto_streams_when_the_model_fits_several_gpus_together_but_not_one(tiny_vl_dir, tmp_path):
    """Eight GPUs whose memory together holds the model, none alone: streaming (one GPU busy, 1.01x the
    in-memory throughput on an H200), not accelerate's device_map (one GPU busy at a time); memory when one fits."""
    from reap_vlm.verify import describe

    settings = _settings(tiny_vl_dir, tmp_path, execution="auto")
    settings.device = "auto"
    need = describe(tiny_vl_dir, None)["scoring_memory_gib"][settings.scoring_mode] * 2**30
    eighth = int(need / 6)  # 8 GPUs of 1/6 each: 1.33x the need together
    spread = choose(settings, gpu_free=[eighth] * 8)
    assert spread.mode == "stream"
    assert "do not fit" in spread.reason and "the largest of the 8 visible GPUs" in spread.reason
    assert "not accelerate's device_map" in spread.reason and "REAP_EXECUTION=memory keeps it" in spread.reason
    assert "\n" not in spread.reason
    fits = choose(settings, gpu_free=[eighth] * 7 + [int(need) + 1])
    assert fits.mode == "memory" and "fit the" in fits.reason and "the largest of the 8 visible GPUs" in fits.reason
    settings.execution = "memory"  # the device_map stays available
    assert choose(settings, gpu_free=[eighth] * 8).mode == "memory"
