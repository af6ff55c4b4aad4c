"""The test stage streamed vs in memory on a real-width Qwen3-VL-30B-A3B skeleton (random weights).

1. Writes the skeleton of bench_stream.py (real tensor names, shapes and hub layout, `--layers` decoder
   layers, bf16; made on the GPU) and prunes it to half its experts (the first 64 of 128 in every block,
   the checkpoint writer of the prune stage).
2. Runs the test stage (pruned vs original, the built-in held-out set) three times, each in its own process:
     memory    both models on the GPU, no cap, REAP_GENERATION=skip
     stream    REAP_EXECUTION=stream, the GPU capped by torch.cuda.set_per_process_memory_fraction to one
               third of the original's weight bytes (at least 2 layers + 2.25 GiB: gpu_cap),
               REAP_GENERATION=skip
     offload   as stream, with REAP_GENERATION=offload on `--prompts` prompts (accelerate's offload under
               the same cap, `--max-new-tokens` tokens)
   and reports each run's seconds, GPU peak (max_memory_allocated) and CPU peak RSS, the streamed runs'
   loader counters, whether the pre-layer parts ran once, the largest relative difference of the report's
   metrics between memory and stream, and the streamed run's peaks against the bounds of docs/design.md
   ("Memory bounds": the GPU's with the metrics' 256 MiB chunk, the CPU's as StreamedModel.cpu_bound_bytes).

Usage:  python bench/bench_stream_test.py [--layers 12] [--samples 24] [--work DIR] [--out result.json]
        python bench/bench_stream_test.py --small      # CPU smoke test (tiny widths)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
_spec = importlib.util.spec_from_file_location("bench_stream", Path(__file__).with_name("bench_stream.py"))
bench_stream = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_stream)


def make_pruned(src: Path, dst: Path) -> Path:
    from reap_vlm.checkpoint import inspect_checkpoint, plan_prune, write_pruned

    if (dst / "config.json").is_file():
        return dst
    layout = inspect_checkpoint(src)
    keep = {k: list(range(n // 2)) for k, n in layout.counts().items()}
    provenance = {"kept": {f"{k[0]}.{k[1]}": v for k, v in keep.items()}, "source": {"config_sha256": "-"}}
    write_pruned(plan_prune(layout, keep), dst, provenance=provenance)
    return dst


def gpu_cap(model_dir: Path) -> float:
    """The streamed runs' GPU cap: a third of the original's weights, but at least what streaming needs
    (two decoder layers + the metrics' 256 MiB chunk + 1 GiB, docs/design.md) + 1 GiB for the capture, so
    that a skeleton of a few layers can be run (both models together are still far above it)."""
    from reap_vlm.checkpoint import inspect_checkpoint

    layer = sum(t.nbytes for n, t in inspect_checkpoint(model_dir).tensors.items() if ".layers.0." in n)
    return max(bench_stream.weight_bytes(model_dir) / 3, 2 * layer + 2**28 + 2 * 2**30)


def child(args) -> None:
    """One test-stage run in this process; writes <work>/<mode>.json."""
    from reap_vlm.cli import main

    cuda = torch.cuda.is_available() and not args.small
    cap = None
    if cuda and args.child != "memory":
        total = torch.cuda.get_device_properties(0).total_memory
        cap = gpu_cap(args.work / "model")
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
    out = args.work / args.child
    if out.exists():
        shutil.rmtree(out)  # this bench's own output folder of an earlier run
    argv = ["--pruned-model-path", str(args.work / "pruned"), "--original-model-path", str(args.work / "model")]
    argv += ["--output-path", str(out), "--device", "cuda" if cuda else "cpu"]
    argv += ["--dtype", "bfloat16" if cuda else "float32", "--eval-samples", str(args.samples)]
    argv += ["--max-seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
    argv += ["--execution", "memory" if args.child == "memory" else "stream"]
    argv += ["--stream-cache-gb", str(args.cache_gb), "--max-new-tokens", str(args.max_new_tokens)]
    if args.child == "offload":
        argv += ["--generation", "offload", "--offload-prompts", str(args.prompts)]
    else:
        argv += ["--generation", "skip"]
    started = time.perf_counter()
    code = main("test", __import__("reap_vlm.evaluate", fromlist=["run"]).run, argv)
    seconds = time.perf_counter() - started
    report = json.loads((out / "report" / "report.json").read_text())
    result = {
        "mode": args.child,
        "exit_code": code,
        "seconds_stage": round(seconds, 2),
        "execution": report["execution"],
        "generation": {k: v for k, v in report["generation"].items() if k != "samples"},
        "generated": [
            {k: g.get(k) for k in ("sample", "answer", "original_answer")} for g in report["generation"]["samples"]
        ],
        "gpu_peak_gib": torch.cuda.max_memory_allocated(0) / 2**30 if cuda else None,
        "gpu_cap_gib": cap / 2**30 if cap else None,
        "cpu_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "metrics": report["metrics"],
        "tasks": report["tasks"],
        "failures": report["failures"],
    }
    (args.work / f"{args.child}.json").write_text(json.dumps(result, indent=1))


def _max_rel(a, b) -> float:
    if isinstance(a, dict):
        return max((_max_rel(a[k], b[k]) for k in a if k in b), default=0.0)
    if isinstance(a, list):
        return max((_max_rel(x, y) for x, y in zip(a, b, strict=True)), default=0.0)
    if isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b):
        return abs(a - b) / max(abs(a), abs(b), 1e-30)
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--samples", type=int, default=24, help="held-out samples (REAP_EVAL_SAMPLES)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cache-gb", type=float, default=32.0, help="REAP_STREAM_CACHE_GB of the streamed runs")
    parser.add_argument("--prompts", type=int, default=2, help="REAP_OFFLOAD_PROMPTS of the offload run")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--modes", default="memory,stream,offload")
    parser.add_argument("--work", type=Path, default=Path("bench_stream_test_work"))
    parser.add_argument("--small", action="store_true", help="tiny widths on the CPU (a smoke test)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=("memory", "stream", "offload"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.layers, args.samples, args.seq_len, args.batch_size = min(args.layers, 4), min(args.samples, 8), 96, 3
    if args.child:
        child(args)
        return
    started = time.perf_counter()
    sizes = bench_stream.SMALL if args.small else bench_stream.REAL
    dtype = torch.float32 if args.small else torch.bfloat16
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    model_dir = bench_stream.make_checkpoint(args.work / "model", sizes, args.layers, dtype, device)
    pruned_dir = make_pruned(model_dir, args.work / "pruned")
    built = time.perf_counter() - started
    gib = {d.name: bench_stream.weight_bytes(d) / 2**30 for d in (model_dir, pruned_dir)}
    print(f"original {gib['model']:.2f} GiB, pruned {gib['pruned']:.2f} GiB ({built:.0f} s)")
    runs = {}
    result = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
        "layers": args.layers,
        "weights_gib": gib,
        "seconds_checkpoints": round(built, 1),
        "runs": runs,
    }
    for mode in args.modes.split(","):
        cmd = [sys.executable, __file__, "--child", mode, "--work", str(args.work), "--layers", str(args.layers)]
        cmd += ["--samples", str(args.samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
        cmd += ["--cache-gb", str(args.cache_gb), "--prompts", str(args.prompts)]
        cmd += ["--max-new-tokens", str(args.max_new_tokens)] + (["--small"] if args.small else [])
        subprocess.run(cmd, check=True)
        runs[mode] = json.loads((args.work / f"{mode}.json").read_text())
        if args.out:  # after every run: a run cut off at a time limit keeps what was measured
            args.out.write_text(json.dumps(result, indent=1))
    if "memory" in runs and "stream" in runs:
        result["max_rel_diff_metrics"] = _max_rel(runs["memory"]["metrics"], runs["stream"]["metrics"])
        result["max_rel_diff_tasks"] = _max_rel(runs["memory"]["tasks"], runs["stream"]["tasks"])
        result["same_failures"] = runs["memory"]["failures"] == runs["stream"]["failures"]
    if "stream" in runs:  # docs/design.md, "Memory bounds" (C = the metrics' 256 MiB chunk)
        mem = runs["stream"]["execution"]["memory"]
        bounds = {
            "gpu_stream": max(mem["outer_parts_gib"] + 1, mem["reserve_gib"]) + mem["gpu_cache_peak_gib"],
            "cpu_stream": mem["cpu_bound_gib"],  # StreamedModel.cpu_bound_bytes: baseline + cache + args + layers + ...
        }
        result["bounds_gib"] = {**mem, **bounds}
        peak = runs["stream"]["gpu_peak_gib"]
        result["within_bounds"] = {
            "gpu": peak is None or peak <= bounds["gpu_stream"],
            "cpu": runs["stream"]["cpu_peak_rss_gib"] <= bounds["cpu_stream"],
        }
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
