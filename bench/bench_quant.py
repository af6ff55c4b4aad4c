"""Quantized vs bf16 scoring: an FP8 block-wise skeleton of Qwen3-VL-30B-A3B (experts in FP8) against the bf16 one.

1. Writes the bf16 skeleton of bench/bench_stream.py (the real tensor names, shapes and hub layout of
   Qwen3-VL-30B-A3B, `--layers` decoder layers, random weights), or takes `--model DIR`.
2. Makes its quantized twins with the formats' own producers (reap_vlm.tiny.quantize_checkpoint): `fp8` =
   Qwen's FP8 release layout, every routed expert's gate/up/down stored one by one as e4m3 with a
   `weight_scale_inv` per [128, 128] block (transformers' Fp8Quantize); attention, router, vision tower,
   embeddings and head stay bf16. `--formats fp8,ct-int4,ct-fp8` adds compressed-tensors twins.
3. Scores every checkpoint in full mode (the default; `--mode`), each run in its own process, in each
   execution of `--runs` (memory, stream) on the same calibration batches, and reports per quantized
   format and execution: tokens/s and the ratio to bf16 (target >= 0.8 for fp8), GPU peak
   (max_memory_allocated) against the FP8 weights and the streamed bound of docs/design.md, the largest
   relative difference of the raw sums and of the REAP scores to the bf16 run, the share of routed pairs
   that moved to other experts, and the overlap of the REAP keep plans at 25 % and 50 % pruning (the share
   of kept experts both plans keep).

Usage:  python bench/bench_quant.py [--layers 6] [--samples 256] [--runs memory,stream] [--out result.json]
        python bench/bench_quant.py --small      # CPU smoke test (tiny widths, a few samples)
        python bench/bench_quant.py --model DIR --formats fp8,ct-int4 --runs memory   # a real bf16 model
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_stream import REAL, SMALL, _max_rel, make_checkpoint, weight_bytes  # noqa: E402

CHUNK_MB = 768  # REAP_CHUNK_MEMORY_MB's default: full mode's all-expert chunks


def layer_bytes(model_dir: Path) -> tuple[int, int]:
    """(largest decoder layer, everything outside the decoder layers) in bytes on disk."""
    import re

    from reap_vlm.checkpoint import inspect_checkpoint

    per_layer: dict[int, int] = {}
    outer = 0
    for name, t in inspect_checkpoint(model_dir).tensors.items():
        m = re.search(r"language_model\.layers\.(\d+)\.", name)
        if m:
            per_layer[int(m.group(1))] = per_layer.get(int(m.group(1)), 0) + t.nbytes
        else:
            outer += t.nbytes
    return max(per_layer.values()), outer


def child(args) -> None:
    """One scoring run in this process; writes <work>/<name>-<execution>.json."""
    from reap_vlm.reap import score
    from reap_vlm.settings import ReapSettings, load

    model_dir = Path(args.child_model)
    cuda = torch.cuda.is_available() and not args.small
    name = f"{args.child_name}-{args.child}"
    argv = ["--model-path", str(model_dir), "--output-path", str(args.work / name)]
    argv += ["--device", "cuda" if cuda else "cpu", "--dtype", "bfloat16" if cuda else "float32"]
    argv += ["--max-samples", str(args.samples), "--max-seq-len", str(args.seq_len), "--scoring-mode", args.mode]
    argv += ["--batch-size", str(args.batch_size), "--eval-samples", "0", "--no-plots", "--execution", args.child]
    if args.small:
        argv += ["--min-pixels", "1024", "--max-pixels", "16384"]
    settings = load(ReapSettings, argv, {})
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    meta = score(settings)
    tokens = meta["calibration"]["tokens"]
    result = {
        "model": args.child_name,
        "execution": args.child,
        "seconds_stage": round(time.perf_counter() - started, 2),
        "seconds_scoring": meta["scoring"]["seconds"],
        "tokens": tokens,
        "tokens_per_s": (tokens["text"] + tokens["image"]) / meta["scoring"]["seconds"],
        "gpu_peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "cpu_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "metadata": str(settings.metadata_file),
        "quantization": meta["model"].get("quantization"),
    }
    (args.work / f"{name}.json").write_text(json.dumps(result, indent=1))


def plan_overlap(a: dict, b: dict, ratio: float) -> float:
    """Mean over MoE blocks of |kept_a ∩ kept_b| / kept, for the REAP plans of two metadata files at `ratio`."""
    from reap_vlm.scoring import plan

    args = dict(criterion="reap", ratio=ratio, num_keep=0)
    pa, pb = plan(a["layers"], a["model"]["blocks"], **args), plan(b["layers"], b["model"]["blocks"], **args)
    shares = [len(set(pa[k]["kept"]) & set(pb[k]["kept"])) / len(pa[k]["kept"]) for k in pa]
    return sum(shares) / len(shares)


def score_difference(a: dict, b: dict) -> dict:
    """Relative difference of the REAP scores (every expert of every block): median, 90th percentile, max;
    and the share of routed (token, expert) pairs that moved between experts."""
    import numpy as np

    from reap_vlm.scoring import criterion_scores

    rel, moved = [], []
    for key in a["layers"]:
        sa, sb = (criterion_scores(m["layers"][key]["stats"]["all"], "reap") for m in (a, b))
        ok = np.isfinite(sa) & np.isfinite(sb)
        rel.extend((np.abs(sa[ok] - sb[ok]) / np.maximum(np.abs(sa[ok]), 1e-30)).tolist())
        ca, cb = (np.array(m["layers"][key]["stats"]["all"]["count"]) for m in (a, b))
        moved.append(float(np.abs(ca - cb).sum() / max(ca.sum(), 1) / 2))
    return {
        "reap_score_rel_diff_median": float(np.median(rel)),
        "reap_score_rel_diff_p90": float(np.percentile(rel, 90)),
        "reap_score_rel_diff_max": float(max(rel)),
        "routed_pairs_moved": sum(moved) / len(moved),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--samples", type=int, default=256, help="calibration samples (combined: text + images)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mode", default="full", choices=("full", "routed", "router"))
    parser.add_argument("--runs", default="memory,stream", help="executions to time: memory, stream or both")
    parser.add_argument("--formats", default="fp8", help="quantized twins: fp8, ct-int4, ct-fp8")
    parser.add_argument("--model", type=Path, help="a bf16 checkpoint to use instead of the skeleton")
    parser.add_argument("--block", type=int, help="FP8 block size (default 128, 16 with --small)")
    parser.add_argument("--group", type=int, help="int4 group size of ct-int4 (default: the block size)")
    parser.add_argument("--work", type=Path, default=Path("bench_quant_work"))
    parser.add_argument("--small", action="store_true", help="tiny widths on the CPU (a smoke test)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=("memory", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--child-model", help=argparse.SUPPRESS)
    parser.add_argument("--child-name", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.layers, args.samples, args.seq_len, args.batch_size = min(args.layers, 3), min(args.samples, 12), 96, 3
    if args.child:
        child(args)
        return
    from reap_vlm import metadata
    from reap_vlm.tiny import quantize_checkpoint

    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    sizes = SMALL if args.small else REAL
    bf16 = args.model or make_checkpoint(
        args.work / "bf16", sizes, args.layers, torch.float32 if args.small else torch.bfloat16
    )
    block = args.block or (16 if args.small else 128)
    models = {"bf16": bf16}
    for fmt in args.formats.split(","):
        target = args.work / fmt
        if not (target / "config.json").is_file():
            quantize_checkpoint(bf16, target, fmt, block=block, group=args.group or block, parts=("experts.",))
        models[fmt] = target
    built = time.perf_counter() - started
    print(
        f"checkpoints built in {built:.0f} s: "
        + ", ".join(f"{k} {weight_bytes(v) / 2**30:.2f} GiB" for k, v in models.items())
    )
    runs: dict[str, dict] = {}
    for execution in args.runs.split(","):
        for name, model_dir in models.items():
            cmd = [sys.executable, __file__, "--child", execution, "--child-model", str(model_dir)]
            cmd += ["--child-name", name, "--work", str(args.work), "--samples", str(args.samples)]
            cmd += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--mode", args.mode]
            cmd += ["--small"] if args.small else []
            subprocess.run(cmd, check=True)
            runs[f"{name}-{execution}"] = json.loads((args.work / f"{name}-{execution}.json").read_text())
    largest_bf16, outer_bf16 = layer_bytes(bf16)
    result: dict = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.small else "cpu",
        "layers": args.layers,
        "mode": args.mode,
        "seconds_building": round(built, 1),
        "weights_gib": {k: weight_bytes(v) / 2**30 for k, v in models.items()},
        "runs": runs,
        "compare": {},
        # docs/design.md, "Streamed execution": GPU = outer parts + 2 x largest layer (dequantized: the bf16
        # layer) + chunk budget + 1 GiB
        "gpu_stream_bound_gib": (outer_bf16 + 2 * largest_bf16 + CHUNK_MB * 2**20 + 2**30) / 2**30,
    }
    for execution in args.runs.split(","):
        base = runs[f"bf16-{execution}"]
        a = metadata.read(Path(base["metadata"]))
        for fmt in models:
            if fmt == "bf16":
                continue
            run = runs[f"{fmt}-{execution}"]
            b = metadata.read(Path(run["metadata"]))
            quant_bytes = weight_bytes(models[fmt])
            peak = run["gpu_peak_gib"]
            bound = result["gpu_stream_bound_gib"] if execution == "stream" else None
            result["compare"][f"{fmt}-{execution}"] = {
                "throughput_ratio": run["tokens_per_s"] / base["tokens_per_s"],
                "throughput_target_met": run["tokens_per_s"] / base["tokens_per_s"] >= 0.8,
                "gpu_peak_gib": peak,
                "quantized_weights_gib": quant_bytes / 2**30,
                "gpu_peak_within_weights_plus_bounds": None
                if peak is None
                else peak <= (bound if bound is not None else quant_bytes / 2**30 + (CHUNK_MB * 2**20 + 2**30) / 2**30),
                "max_rel_diff_raw_sums_vs_bf16": _max_rel(a["layers"], b["layers"]),
                "plan_overlap_25": plan_overlap(a, b, 0.25),
                "plan_overlap_50": plan_overlap(a, b, 0.5),
                **score_difference(a, b),
            }
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
