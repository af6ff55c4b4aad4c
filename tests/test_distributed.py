"""Data-parallel scoring (reap_vlm.distributed) on CPU with the gloo backend: 2 and 4 processes started by the
launcher (torch.distributed.run) give the metadata of one process on the same batches — counts, tokens and
max |f| exactly, every other float64 sum to 1e-9 relative, the same plan and the same candidate table — in
memory and streamed, on text + image calibration; a rank that dies fails the job with one line and nothing
written, and --resume completes it from the ranks' checkpoints."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reap_vlm.settings import ReapSettings, load

ROOT = Path(__file__).resolve().parents[1]
RTOL = 1e-9
CALIBRATION = "code:3,writing:2,vision:4"  # text and image batches


def _argv(model_dir: Path, out: Path, **extra) -> list[str]:
    argv = ["--model-path", str(model_dir), "--output-path", str(out), "--device", "cpu", "--max-samples", "9"]
    argv += ["--max-seq-len", "96", "--batch-size", "2", "--no-plots", "--calibration", CALIBRATION]
    argv += ["--min-pixels", "1024", "--max-pixels", "16384", "--eval-ratios", "0.5"]
    # no merge rows: their alignment uses sampled activations, which N ranks draw differently (distributed.reduce_merge)
    for k, v in {"eval_samples": 0, "no_eval_merge": True, **extra}.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return argv


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env.update({"PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    return env


def _launch(n: int, script: str, argv: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    """`python -m reap_vlm.distributed --standalone --nproc-per-node n script argv` (torchrun, one node)."""
    cmd = [sys.executable, "-m", "reap_vlm.distributed", "--standalone", f"--nproc-per-node={n}", script, *argv]
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _single(model_dir: Path, out: Path, **extra) -> dict:
    """The single process with one thread, as every rank has (_env): a CPU matmul's rounding can depend on how
    many threads split it, and max-activation is compared exactly."""
    import torch

    from reap_vlm.reap import score

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return score(load(ReapSettings, _argv(model_dir, out, **extra), {}))
    finally:
        torch.set_num_threads(threads)


worst: list[float] = []


def _close(a, b, path: str = "") -> None:
    """Numbers of `b` within RTOL (relative) of `a`, everything else identical; records the worst difference."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float) and isinstance(b, float) and math.isfinite(a):
        rel = abs(a - b) / max(abs(a), abs(b), 1e-300)
        worst.append(rel)
        assert rel <= RTOL, f"{path}: {a} vs {b}"
    else:
        assert a == b or (isinstance(a, float) and math.isnan(a) and math.isnan(b)), f"{path}: {a!r} vs {b!r}"


def _exact_fields(one: dict, many: dict) -> None:
    """What the guarantee says is exact: counts, tokens and max |f| of every block and modality."""
    for key, layer in one["layers"].items():
        for modality, entry in layer["stats"].items():
            other = many["layers"][key]["stats"][modality]
            assert entry["tokens"] == other["tokens"] and entry["count"] == other["count"], (key, modality)
            assert entry["max_abs"] == other["max_abs"], (key, modality)


def _untimed(table: dict) -> dict:
    table = json.loads(json.dumps(table))
    for key in ("seconds", "greedy_seconds"):
        table.pop(key, None)
    for row in table.get("rows", []):
        row.get("search", {}).pop("seconds", None)
    return table


def _same(one: dict, out: Path, ranks: int) -> dict:
    many = json.loads((out / "reap_metadata.json").read_text())
    assert many["scoring"]["ranks"] == ranks and one["scoring"]["ranks"] == 1
    assert many["scoring"]["batches"] == one["scoring"]["batches"]
    assert many["calibration"] == one["calibration"] and many["model"] == one["model"]
    _exact_fields(one, many)
    _close(one["layers"], many["layers"])  # raw sums, scores, kept, protected
    assert many["plan"] == one["plan"]
    assert ("candidates" in many) == ("candidates" in one)
    if "candidates" in one:  # the rows are the same per-sample sums, put back in batch order: identical
        assert _untimed(many["candidates"]) == _untimed(one["candidates"])
    assert one["calibration"]["tokens"]["image"] > 0 and one["calibration"]["tokens"]["text"] > 0
    return many


def _same_merge_stats(a_dir: Path, b_dir: Path) -> None:
    from reap_vlm.observe import merge_stats

    (a, _), (b, _) = merge_stats.read(a_dir / merge_stats.FILE_NAME), merge_stats.read(b_dir / merge_stats.FILE_NAME)
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].keys() == b[key].keys()
        for name, t in a[key].items():
            if name == "activations":  # the same number of sampled tokens from the same batches
                assert t.shape == b[key][name].shape and t.shape[1] > 0
            elif name == "mean_gated_output":  # float32 of the same float64 sums
                torch.testing.assert_close(t, b[key][name], rtol=1e-6, atol=1e-7)
            else:
                torch.testing.assert_close(t.double(), b[key][name].double(), rtol=RTOL, atol=0)


def test_two_processes_give_the_metadata_of_one(tiny_vl_dir, tmp_path):
    """In memory, text + image batches, the candidate table (every criterion and random plans; the slow tests
    add the policies and the greedy search)."""
    run = dict(eval_samples=4, criterion="reap")
    one = _single(tiny_vl_dir, tmp_path / "one", **run)
    result = _launch(2, "reap.py", _argv(tiny_vl_dir, tmp_path / "two", **run))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel: 2 ranks" in result.stderr
    many = _same(one, tmp_path / "two", 2)
    assert len(many["candidates"]["rows"]) > 5 and many["candidates"]["heldout"]["samples"] > 2
    _same_merge_stats(tmp_path / "one", tmp_path / "two")
    # only rank 0 wrote: the files of one run, no rank checkpoints, no lock
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


@pytest.mark.slow
@pytest.mark.parametrize(
    "ranks, execution", [(4, "memory"), (2, "stream"), (4, "stream")], ids=["4-memory", "2-stream", "4-stream"]
)
def test_more_ranks_and_streamed_execution_give_the_metadata_of_one(ranks, execution, tiny_vl_dir, tmp_path):
    # 4 ranks in memory: fewer held-out batches than ranks, so one rank measures no plan and adds nothing
    run = dict(eval_samples=2 if (ranks, execution) == (4, "memory") else 4, execution=execution)
    one = _single(tiny_vl_dir, tmp_path / "one", **run)
    result = _launch(ranks, "reap.py", _argv(tiny_vl_dir, tmp_path / "many", **run))
    assert result.returncode == 0, result.stderr[-3000:]
    many = _same(one, tmp_path / "many", ranks)
    assert many["scoring"]["execution"]["mode"] == execution
    greedy = [r for r in many["candidates"]["rows"] if r["policy"] == "greedy"]
    assert greedy  # in both modes (the table equals one process', greedy row included)
    if execution == "stream":  # the plans measured in the statistics' pass as in one process, then one pass per
        # greedy step and one for its plan unless measured already; with fewer held-out batches than ranks
        # (4 ranks: the bucketed held-out slice fits in fewer batches) the plans take a pass of their own
        steps = greedy[0]["search"]["added_per_block"]
        swap = 1 if any(r["policy"] == "swap" for r in many["candidates"]["rows"]) else 0  # a measurement at least
        assert one["scoring"]["execution"]["passes"] >= 1 + steps + swap
        assert many["scoring"]["execution"]["passes"] >= one["scoring"]["execution"]["passes"] - 1
    _same_merge_stats(tmp_path / "one", tmp_path / "many")


# rank 1 is killed (SIGKILL: no handler, no last words) at the start of its third batch
DYING_CHILD = """
import os, signal, sys
import torch.distributed as dist
import reap_vlm.observe.observer as o
original, calls = o.Observer.set_modality, [0]
def dying(self, modality):
    calls[0] += 1
    if dist.is_initialized() and dist.get_rank() == 1 and calls[0] == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(self, modality)
o.Observer.set_modality = dying
from reap_vlm.cli import main
from reap_vlm.reap import run
sys.exit(main("reap", run, sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_rank_that_dies_fails_the_job_with_one_line_and_resume_completes_it(tiny_vl_dir, tmp_path):
    child = tmp_path / "dying.py"
    child.write_text(DYING_CHILD)
    out = tmp_path / "out"
    run = dict(checkpoint_every=1, max_samples=16, batch_size=1, calibration="code:6,vision:6")
    failed = _launch(2, str(child), _argv(tiny_vl_dir, out, **run))
    assert failed.returncode == 128 + 9, failed.stderr[-3000:]
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith("error: data-parallel job failed: rank 1 (local rank 1) was killed by SIGKILL")
    assert "nothing was written" in last and "--resume" in last
    assert [line for line in failed.stderr.splitlines() if "error" in line.lower()] == [last]  # the one line
    assert "Traceback" not in failed.stderr
    left = sorted(p.name for p in out.iterdir())
    assert "reap_metadata.json" not in left and ".reap_accumulators.rank1-of2.pt" in left, left
    resumed = _launch(2, "reap.py", _argv(tiny_vl_dir, out, resume=True, **run))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    one = _single(tiny_vl_dir, tmp_path / "one", **run)
    many = _same(one, out, 2)
    _same_merge_stats(tmp_path / "one", out)  # the merge statistics resume per rank too
    assert many["scoring"]["resumed"] is True
    assert not [p.name for p in out.iterdir() if p.name.startswith(".reap_accumulators")]


def test_sharding_and_checkpoint_names_of_a_single_process(tmp_path):
    """Without a launcher nothing changes: every batch, the one checkpoint name, the statistics as they are."""
    from reap_vlm import distributed
    from reap_vlm.settings import launcher_environment

    assert not distributed.active() and distributed.world() == 1 and distributed.is_writer()
    items = [1, 2, 3]
    assert distributed.shard(items) is items  # the very list (the streamed pass recognises its batches by it)
    assert distributed.checkpoint_name(".reap_accumulators.pt") == ".reap_accumulators.pt"
    stats = {"b": {"text": {"tokens": 1}}}
    assert distributed.reduce_stats(stats) is stats
    assert launcher_environment({}) == {"world_size": 1, "rank": 0, "local_rank": 0}
    assert launcher_environment({"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})["rank"] == 2


# ---- model parallel: a model placed over several devices --------------------------------------------------


def _calibration_batches(processor):
    from reap_vlm.calibration import load_samples, make_batches

    samples = load_samples("code:2,vision:2", "calibration", max_samples=4, seed=0, image_share=0.5, shuffle=True)
    pixels = dict(min_pixels=1024, max_pixels=16384)
    return list(make_batches(samples, processor, max_seq_len=96, batch_size=2, packing=False, **pixels))


def _observe(model, blocks, batches, mode: str) -> dict:
    from reap_vlm.execution.memory import forward
    from reap_vlm.observe import Observer

    observer = Observer(model, blocks, mode)
    with observer, torch.inference_mode():
        for batch in batches:
            observer.set_modality(batch.modality)
            forward(model, batch)
    return observer.export()


@pytest.mark.parametrize("mode", ["full", pytest.param("routed", marks=pytest.mark.slow), "router"])
def test_layers_offloaded_by_accelerate_give_the_statistics_of_one_device(mode, tiny_vl_dir, tmp_path):
    """accelerate's device_map places the first decoder layer on the CPU and offloads the others to disk (their
    parameters stay on the meta device and are loaded for each forward), as device_map=auto does when the GPUs
    are full: the observers' totals follow the data to the execution device and the statistics are identical."""
    from accelerate import dispatch_model

    from reap_vlm.loading import load_model
    from reap_vlm.moe import find_moe_blocks

    model, processor, _ = load_model(tiny_vl_dir, device="cpu")
    blocks = find_moe_blocks(model)
    batches = _calibration_batches(processor)
    reference = _observe(model, blocks, batches, mode)
    placed, _, _ = load_model(tiny_vl_dir, device="cpu")
    text = "model.language_model"
    device_map = {"model.visual": "cpu", f"{text}.embed_tokens": "cpu", f"{text}.layers.0": "cpu"}
    device_map.update({f"{text}.layers.{i}": "disk" for i in range(1, placed.config.text_config.num_hidden_layers)})
    device_map.update({f"{text}.norm": "cpu", f"{text}.rotary_emb": "cpu", "lm_head": "cpu"})
    placed = dispatch_model(placed, device_map=device_map, main_device="cpu", offload_dir=str(tmp_path / "offload"))
    assert next(placed.get_submodule(blocks[-1].experts).parameters()).device.type == "meta"
    assert json.dumps(_observe(placed, blocks, batches, mode), sort_keys=True) == json.dumps(reference, sort_keys=True)


def test_device_map_over_several_gpus_keeps_every_moe_block_on_one_device(tiny_vl_dir):
    """Meta-device placement check: the device map load_model's device_map=auto computes for four GPUs of about two
    decoder layers each spreads the decoder layers over the GPUs, and never splits a decoder layer, so a block's
    router, experts and its observer's totals (made on the experts' device) share one device."""
    import warnings

    from accelerate import infer_auto_device_map, init_empty_weights
    from accelerate.utils import compute_module_sizes
    from transformers import AutoConfig, AutoModelForImageTextToText

    from reap_vlm.moe import find_moe_blocks

    with init_empty_weights():
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(tiny_vl_dir))
    sizes = compute_module_sizes(model)
    layer = sizes["model.language_model.layers.0"]  # GPUs of about two decoder layers (the first: + vision tower)
    memory = {0: sizes["model.visual"] + int(2.2 * layer), 1: int(2.2 * layer), 2: int(2.2 * layer), 3: 2**30}
    with warnings.catch_warnings():  # "Device 0 is not available": the GPUs are the ones of the map only
        warnings.simplefilter("ignore")
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=model._no_split_modules)

    def device_of(name: str):
        prefixes = [p for p in device_map if name == p or name.startswith(p + ".") or p == ""]
        return device_map[max(prefixes, key=len)]

    blocks = find_moe_blocks(model)
    assert len({device_of(b.experts) for b in blocks}) > 1  # the layers are spread over the devices
    for b in blocks:
        assert device_of(b.router) == device_of(b.experts) == device_of(b.block.rsplit(".", 1)[0]), b.key


@pytest.mark.slow
def test_bad_input_in_a_data_parallel_job_is_the_ranks_line_and_exit_2(tmp_path):
    result = _launch(2, "reap.py", ["--model-path", str(tmp_path / "missing"), "--output-path", str(tmp_path / "o")])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: data-parallel job failed: rank ") and "exited with code 2" in lines[-1]
    assert "Fix what the line above says" in lines[-1] and "--resume" not in lines[-1]
    assert any(line.startswith("error: ") and "missing" in line for line in lines[:-1])
    assert "Traceback" not in result.stderr and not (tmp_path / "o").exists()


@pytest.mark.slow
def test_accelerate_launch_gives_the_metadata_of_one_process(tiny_vl_dir, tmp_path):
    """`accelerate launch --multi_gpu` runs torch.distributed.run too (with CUDA hidden the ranks use the CPU)."""
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "reap.py", *_argv(tiny_vl_dir, tmp_path / "two")]
    result = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "data parallel: 2 ranks" in result.stdout
    _same(_single(tiny_vl_dir, tmp_path / "one"), tmp_path / "two", 2)


@pytest.mark.slow
def test_a_stopped_job_is_one_line_and_keeps_the_ranks_checkpoints(tiny_vl_dir, tmp_path):
    """SIGTERM to the launcher (a scheduler's stop): every rank stops, one line, exit 143, nothing written."""
    import signal
    import time

    out = tmp_path / "out"
    argv = _argv(tiny_vl_dir, out, checkpoint_every=1, max_samples=16, batch_size=1, calibration="code:6,vision:6")
    cmd = [sys.executable, "-m", "reap_vlm.distributed", "--standalone", "--nproc-per-node=2", "reap.py", *argv]
    job = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not (out / ".reap_accumulators.rank1-of2.pt").exists():  # both ranks are scoring
        assert job.poll() is None and time.monotonic() < deadline, "the job ended before its first checkpoint"
        time.sleep(0.2)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode == 143, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert errors == [errors[-1]] and errors[-1].startswith("error: data-parallel job interrupted (SIGTERM)")
    assert "Traceback" not in stderr and not (out / "reap_metadata.json").exists()
    assert (out / ".reap_accumulators.rank1-of2.pt").exists()  # kept for --resume
