"""Quantized vs bf16 scoring: an FP8 block-wise skeleton of Qwen3-VL-30B-A3B (experts in FP8) against the bf16 one.

1. Writes the bf16 skeleton of bench/bench_stream.py (the real tensor names, shapes and hub layout of
   Qwen3-VL-30B-A3B, `--layers` decoder layers, random weights drawn on the GPU), or takes `--model DIR`.
2. Makes its quantized twins with the formats' own producers (reap_vlm.tiny.quantize_checkpoint, on the GPU
   when there is one): `fp8` = Qwen's FP8 release layout, every routed expert's gate/up/down stored one by
   one as e4m3 with a `weight_scale_inv` per [128, 128] block (transformers' Fp8Quantize); attention,
   router, vision tower, embeddings and head stay bf16. `--formats fp8,ct-int4,ct-fp8` adds
   compressed-tensors twins.
3. Scores every checkpoint with the observer (full mode by default, `--mode`) on the same calibration
   batches, each run in its own process: in memory (`memory`: reap_vlm.loading.load_model; on a GPU an FP8
   checkpoint's experts stay e4m3 in transformers' FP8Experts, a compressed-tensors one's as stored in
   PackedExperts, and full mode dequantizes them chunk by chunk)
   and streamed (`stream`: one dequantized layer resident, execution.stream). In memory the first
   `--warmup` batches (compiled epilogues, allocator) are left out of the timing; the streamed pass runs
   once on them first and is then timed whole. bf16 runs in memory (and streamed with `--bf16-stream`).
   `--repeats N` (in memory): after that first pass (whose statistics are compared), N more windows of whole
   passes over all batches, each at least `--min-seconds` long (5 s), each with a fresh observer; the run's
   tokens/s is then the median window's, and every window is reported.
4. Reports per run tokens/s, GPU peak (max_memory_allocated, loading included), for FP8 kept in memory the
   experts implementation that ran and the largest dequantized expert bytes alive at once; per quantized
   run the ratio to bf16 in memory (target >= 0.8 for fp8), GPU peak against the quantized weights + chunk
   budget + 1 GiB (in memory) or the streamed bound of docs/design.md, the largest relative difference of
   the raw sums and of the REAP scores to the bf16 run, the share of routed pairs that moved to other
   experts, and the overlap of the REAP keep plans at 25 % and 50 % pruning.

`--profile` (in memory): after the timing, torch.profiler over one batch: the top CUDA ops by self time, the
host waits, the dequantized chunks per layer (<work>/<run>-profile.txt has the whole table).

Usage:  python bench/bench_quant.py [--layers 4] [--samples 64] [--runs memory,stream] [--out result.json]
        python bench/bench_quant.py --runs memory --repeats 3 --min-seconds 5   # FP8 vs bf16 throughput
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
DYNAMO_COUNTERS = ("stats", "graph_break", "recompiles")  # whether the compiled dequantization recompiled


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


def _batches(args, processor):
    from reap_vlm.calibration import load_samples, make_batches

    samples = load_samples(args.calibration, max_samples=args.samples, seed=0)
    pixels = dict(min_pixels=1024, max_pixels=16384) if args.small else {}
    return list(make_batches(samples, processor, max_seq_len=args.seq_len, batch_size=args.batch_size, **pixels))


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def _dequantize_check(experts, cuda: bool) -> dict:
    """One layer's FP8 experts dequantized chunk by chunk as full mode does: milliseconds per layer (through
    ExpertWeights.experts, and the eager op alone), whether that gives transformers' eager Fp8Dequantize bit
    for bit, and the same op torch.compile'd (timed, and checked against eager) for comparison."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from reap_vlm.moe import expert_weights
    from reap_vlm.quantization import experts_per_chunk

    w = expert_weights(experts)
    step = experts_per_chunk(w, CHUNK_MB << 20)
    eager = Fp8Dequantize(None)._dequantize_one
    same = True
    for e0 in range(0, w.num_experts, step):
        c = w.experts(e0, e0 + step)
        ref = eager(experts.gate_up_proj[e0 : e0 + step], experts.gate_up_proj_scale_inv[e0 : e0 + step], w.dtype)
        same = same and torch.equal(c.gate_up, ref)
        ref = eager(experts.down_proj[e0 : e0 + step], experts.down_proj_scale_inv[e0 : e0 + step], w.dtype)
        same = same and torch.equal(c.down, ref)
        del c, ref

    def timed(make) -> float:
        _sync(cuda)
        t0 = time.perf_counter()
        for _ in range(5):
            for e0 in range(0, w.num_experts, step):
                c = make(e0)
                del c
        _sync(cuda)
        return (time.perf_counter() - t0) / 5 * 1000

    def eager_chunk(e0):
        sl = slice(e0, e0 + step)
        gu = eager(experts.gate_up_proj[sl], experts.gate_up_proj_scale_inv[sl], w.dtype)
        return gu, eager(experts.down_proj[sl], experts.down_proj_scale_inv[sl], w.dtype)

    compiled = torch.compile(eager)

    def compiled_chunk(e0):
        sl = slice(e0, e0 + step)
        gu = compiled(experts.gate_up_proj[sl], experts.gate_up_proj_scale_inv[sl], output_dtype=w.dtype)
        return gu, compiled(experts.down_proj[sl], experts.down_proj_scale_inv[sl], output_dtype=w.dtype)

    compiled_same = compiled_ms = None
    if cuda:  # (on the CPU the smoke test does not compile)
        compiled_same = all(torch.equal(a, b) for a, b in zip(compiled_chunk(0), eager_chunk(0), strict=True))
        compiled_chunk(w.num_experts - w.num_experts % step if w.num_experts % step else 0)  # the last chunk's
        compiled_ms = timed(compiled_chunk)
    return {
        "dequantize_equals_eager_fp8dequantize": same,
        "dequantize_one_layer_ms": timed(lambda e0: w.experts(e0, e0 + step)),
        "dequantize_one_layer_eager_ms": timed(eager_chunk),
        "dequantize_one_layer_compiled_ms": compiled_ms,
        "compiled_equals_eager": compiled_same,
        "dynamo_counters": {
            k: dict(v) for k, v in torch._dynamo.utils.counters.items() if k in ("stats", "graph_break")
        },
        "experts_per_chunk": step,
    }


def _window(model, blocks, batches, args, cuda: bool) -> tuple[int, float, int]:
    """(tokens, seconds, passes) of whole passes over `batches` in full scoring (a fresh observer, its sums
    added before the clock stops) until at least `args.min_seconds` have passed."""
    from reap_vlm.execution.memory import forward
    from reap_vlm.loading import input_device
    from reap_vlm.observe import Observer

    tokens, passes, seconds = 0, 0, 0.0
    observer = Observer(model, blocks, args.mode, CHUNK_MB)
    with observer, torch.inference_mode():
        _sync(cuda)
        t0 = time.perf_counter()
        while passes == 0 or seconds < args.min_seconds:
            for batch in batches:
                observer.set_modality(batch.modality)
                forward(model, batch, input_device(model))
                tokens += int((batch.modality >= 0).sum())
            observer.flush()
            _sync(cuda)
            passes, seconds = passes + 1, time.perf_counter() - t0
    return tokens, seconds, passes


def _profile(model, blocks, batches, args, cuda: bool, name: str) -> dict:
    """torch.profiler over one batch of full scoring (the last, after the timed passes): where the GPU time
    goes (the top CUDA ops by self time), the host waits (synchronizations, blocking copies), the dequantized
    chunks made per layer, and the batch's milliseconds with and without the profiler. The whole table is
    written to <work>/<name>-profile.txt."""
    from torch.profiler import ProfilerActivity, profile

    from reap_vlm.execution.memory import forward
    from reap_vlm.loading import input_device
    from reap_vlm.observe import Observer
    from reap_vlm.quantization import DEQUANTIZED

    batch = batches[-1]
    observer = Observer(model, blocks, args.mode, CHUNK_MB)
    activities = [ProfilerActivity.CPU] + [ProfilerActivity.CUDA] * cuda
    with observer, torch.inference_mode():

        def one() -> float:
            _sync(cuda)
            t0 = time.perf_counter()
            observer.set_modality(batch.modality)
            forward(model, batch, input_device(model))
            observer.flush()
            _sync(cuda)
            return (time.perf_counter() - t0) * 1000

        one()
        plain = sorted(one() for _ in range(5))[2]
        chunks = DEQUANTIZED.chunks
        with profile(activities=activities) as prof:
            profiled = one()
        chunks = DEQUANTIZED.chunks - chunks
    averages = prof.key_averages()

    def self_device_us(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0)) or 0)

    ops = sorted(averages, key=self_device_us, reverse=True)
    device_total = sum(self_device_us(e) for e in averages)
    top = [
        {"op": e.key[:120], "calls": e.count, "self_cuda_ms": round(self_device_us(e) / 1000, 3)}
        for e in ops[:25]
        if self_device_us(e) > 0
    ]
    waits = {
        e.key: {"calls": e.count, "cpu_ms": round(e.cpu_time_total / 1000, 3)}
        for e in averages
        if "Synchronize" in e.key or "Memcpy" in e.key or e.key in ("aten::item", "aten::_local_scalar_dense")
    }
    sort_by = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    (args.work / f"{name}-profile.txt").write_text(averages.table(sort_by=sort_by, row_limit=60))
    return {
        "batch_tokens": int((batch.modality >= 0).sum()),
        "batch_ms": round(plain, 2),
        "batch_ms_profiled": round(profiled, 2),
        "cuda_self_ms_total": round(device_total / 1000, 2),
        "dequantized_chunks_per_layer": chunks / max(len(blocks), 1),
        "top_cuda_ops": top,
        "host_waits": waits,
    }


def child(args) -> None:
    """One scoring run in this process; writes <work>/<name>-<execution>.json (+ its statistics)."""
    from reap_vlm.execution.memory import forward, precompute_positions
    from reap_vlm.loading import input_device, load_model
    from reap_vlm.moe import find_moe_blocks
    from reap_vlm.observe import Observer
    from reap_vlm.quantization import DEQUANTIZED, fp8_kernels_load, is_fp8_experts, is_quantized_experts

    model_dir = Path(args.child_model)
    cuda = torch.cuda.is_available() and not args.small
    device, dtype = ("cuda", "bfloat16") if cuda else ("cpu", "float32")
    name = f"{args.child_name}-{args.child}"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    extra: dict = {}
    if args.child == "memory":
        # on a GPU a quantized checkpoint keeps its experts quantized by itself; --small makes the CPU do it too
        keep = args.small or None
        model, processor, _ = load_model(
            model_dir, device=device, dtype=dtype, keep_fp8_experts=keep, keep_packed_experts=keep
        )
        loaded = time.perf_counter() - started
        blocks = find_moe_blocks(model)
        batches = _batches(args, processor)
        precompute_positions(model, batches)  # as the reap stage does in memory
        fp8 = [is_fp8_experts(model.get_submodule(b.experts)) for b in blocks]
        kept = [is_quantized_experts(model.get_submodule(b.experts)) for b in blocks]
        if any(kept):
            extra["experts_kept"] = f"{sum(kept)} of {len(kept)} MoE blocks" + (" (FP8)" if any(fp8) else " (packed)")
            extra["fp8_kernels_load"] = fp8_kernels_load(torch.device(device))
            extra["experts_implementation"] = model.get_submodule(blocks[0].experts).config._experts_implementation
        DEQUANTIZED.reset()
        observer = Observer(model, blocks, args.mode, CHUNK_MB)
        warm = min(args.warmup, len(batches) - 1)
        tokens, t0 = 0, time.perf_counter()
        with observer, torch.inference_mode():
            for i, batch in enumerate(batches):
                if i == warm:
                    _sync(cuda)
                    tokens, t0 = 0, time.perf_counter()
                observer.set_modality(batch.modality)
                forward(model, batch, input_device(model))
                tokens += int((batch.modality >= 0).sum())
        _sync(cuda)
        seconds = time.perf_counter() - t0
        stats = observer.export()
        timed = f"batches {warm + 1}..{len(batches)} of {len(batches)} (the first {warm} warm up)"
        if args.repeats:
            # the statistics are the first pass's; the throughput is the median of `--repeats` windows of whole
            # passes over all batches, each window at least `--min-seconds` long, each with a fresh observer
            first = tokens / seconds
            windows = [_window(model, blocks, batches, args, cuda) for _ in range(args.repeats)]
            rates = [t / s for t, s, _ in windows]
            tokens, seconds = sorted(windows, key=lambda w: w[0] / w[1])[len(windows) // 2][:2]
            timed = (
                f"median of {len(windows)} windows of whole passes over all {len(batches)} batches, each at least "
                f"{args.min_seconds:g} s, after a first pass (the statistics') of {first:,.0f} tokens/s"
            )
            extra["windows"] = [
                {"tokens": t, "seconds": round(s, 3), "passes": n, "tokens_per_s": round(t / s)} for t, s, n in windows
            ]
            extra["tokens_per_s_spread"] = [round(min(rates)), round(max(rates))]
        # the scoring's peak; the checks below (the eager reference's fp32 temporaries) are not part of it
        scoring_peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if args.profile:
            extra["profile"] = _profile(model, blocks, batches, args, cuda, name)
        from reap_vlm.quantization import _TRITON_EXACT

        extra["fp8_one_pass_kernel_exact"] = {f"{d} {t}": v for (d, t), v in _TRITON_EXACT.items()}
        if any(kept):
            extra["dequantized_peak_mib"] = DEQUANTIZED.peak / 2**20
            extra["dequantized_chunks"] = DEQUANTIZED.chunks
            if any(fp8):
                extra.update(_dequantize_check(model.get_submodule(blocks[0].experts), cuda))
    else:
        from reap_vlm.execution.stream import StreamedModel, observe

        run = StreamedModel(model_dir, device=device, dtype=dtype, chunk_bytes=CHUNK_MB << 20)
        loaded = time.perf_counter() - started
        blocks = find_moe_blocks(run.model)
        batches = _batches(args, run.processor)
        warm = min(args.warmup, len(batches))
        observe(run, blocks, batches[:warm], args.mode, CHUNK_MB)  # compiled epilogues, allocator
        _sync(cuda)
        t0 = time.perf_counter()
        stats, _ = observe(run, blocks, batches, args.mode, CHUNK_MB)
        _sync(cuda)
        seconds = time.perf_counter() - t0
        tokens = sum(int((b.modality >= 0).sum()) for b in batches)
        timed = f"all {len(batches)} batches, after a pass over the first {warm}"
        run.close()
    stats_file = args.work / f"{name}-stats.json"
    layers = {key: {"stats": s} for key, s in stats.items()}
    block_info = [{"key": b.key, "num_experts": b.num_experts, "top_k": b.top_k, "n_group": b.n_group} for b in blocks]
    stats_file.write_text(json.dumps({"layers": layers, "blocks": block_info}))
    result = {
        "model": args.child_name,
        "execution": args.child,
        "seconds_loading": round(loaded, 2),
        "seconds_timed": round(seconds, 3),
        "timed": timed,
        "tokens_timed": tokens,
        "tokens_per_s": tokens / seconds,
        "gpu_peak_gib": scoring_peak
        if args.child == "memory"
        else (torch.cuda.max_memory_allocated() / 2**30 if cuda else None),
        "gpu_peak_with_checks_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "cpu_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "stats": str(stats_file),
        **extra,
    }
    (args.work / f"{name}.json").write_text(json.dumps(result, indent=1))


def plan_overlap(a: dict, b: dict, ratio: float) -> float:
    """Mean over MoE blocks of |kept_a ∩ kept_b| / kept, for the REAP plans of two runs at `ratio`."""
    from reap_vlm.scoring import plan

    args = dict(criterion="reap", ratio=ratio, num_keep=0)
    pa, pb = plan(a["layers"], a["blocks"], **args), plan(b["layers"], b["blocks"], **args)
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
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (combined: text + images)")
    parser.add_argument("--calibration", default="combined")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="batches left out of the in-memory timing")
    parser.add_argument("--repeats", type=int, default=0, help="in memory: timed windows after the first pass")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="the shortest timed window (--repeats)")
    parser.add_argument("--mode", default="full", choices=("full", "routed", "router"))
    parser.add_argument("--runs", default="memory,stream", help="executions of the quantized twins: memory, stream")
    parser.add_argument("--bf16-stream", action="store_true", help="also score bf16 streamed")
    parser.add_argument(
        "--profile", action="store_true", help="in memory: torch.profiler summary of one batch (<work>/*-profile.txt)"
    )
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
    from reap_vlm.tiny import quantize_checkpoint

    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.small
    device = "cuda" if cuda else "cpu"
    sizes = SMALL if args.small else REAL
    bf16 = args.model or make_checkpoint(
        args.work / "bf16", sizes, args.layers, torch.float32 if args.small else torch.bfloat16, device=device
    )
    block = args.block or (16 if args.small else 128)
    models = {"bf16": bf16}
    for fmt in args.formats.split(","):
        target = args.work / fmt
        if not (target / "config.json").is_file():
            parts = ("experts.",)
            quantize_checkpoint(bf16, target, fmt, block=block, group=args.group or block, parts=parts, device=device)
        models[fmt] = target
    built = time.perf_counter() - started
    print(
        f"checkpoints built in {built:.0f} s: "
        + ", ".join(f"{k} {weight_bytes(v) / 2**30:.2f} GiB" for k, v in models.items()),
        flush=True,
    )
    todo = [("bf16", "memory")] + [("bf16", "stream")] * args.bf16_stream
    todo += [(fmt, execution) for execution in args.runs.split(",") for fmt in models if fmt != "bf16"]
    runs: dict[str, dict] = {}
    for name, execution in todo:
        cmd = [sys.executable, __file__, "--child", execution, "--child-model", str(models[name])]
        cmd += ["--child-name", name, "--work", str(args.work), "--samples", str(args.samples)]
        cmd += ["--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--mode", args.mode]
        cmd += ["--warmup", str(args.warmup), "--calibration", args.calibration]
        cmd += ["--repeats", str(args.repeats), "--min-seconds", str(args.min_seconds)]
        cmd += ["--small"] if args.small else []
        cmd += ["--profile"] if args.profile and execution == "memory" else []
        t = time.perf_counter()
        subprocess.run(cmd, check=True)
        runs[f"{name}-{execution}"] = json.loads((args.work / f"{name}-{execution}.json").read_text())
        r = runs[f"{name}-{execution}"]
        if args.out:  # what is measured so far, should a limit end the bench
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"seconds_building": round(built, 1), "runs": runs}, indent=1))
        print(
            f"{name}-{execution}: {r['tokens_per_s']:,.0f} tokens/s, GPU peak {r['gpu_peak_gib']} GiB "
            f"({time.perf_counter() - t:.0f} s)",
            flush=True,
        )
    largest_bf16, outer_bf16 = layer_bytes(bf16)
    result: dict = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "layers": args.layers,
        "mode": args.mode,
        "chunk_memory_mb": CHUNK_MB,
        "seconds_building": round(built, 1),
        "weights_gib": {k: weight_bytes(v) / 2**30 for k, v in models.items()},
        "runs": runs,
        "compare": {},
        # docs/design.md, "Streamed execution": GPU = outer parts + 2 x largest layer (dequantized: the bf16
        # layer) + chunk budget + 1 GiB
        "gpu_stream_bound_gib": (outer_bf16 + 2 * largest_bf16 + CHUNK_MB * 2**20 + 2**30) / 2**30,
    }
    base = runs["bf16-memory"]
    a = json.loads(Path(base["stats"]).read_text())
    for key, run in runs.items():
        if key.startswith("bf16-"):
            continue
        fmt, execution = key.rsplit("-", 1)
        b = json.loads(Path(run["stats"]).read_text())
        quant_gib = weight_bytes(models[fmt]) / 2**30
        peak = run["gpu_peak_gib"]
        bound = result["gpu_stream_bound_gib"] if execution == "stream" else quant_gib + (CHUNK_MB + 1024) / 1024
        result["compare"][key] = {
            "throughput_ratio_to_bf16_memory": run["tokens_per_s"] / base["tokens_per_s"],
            "throughput_target_met": run["tokens_per_s"] / base["tokens_per_s"] >= 0.8,
            # with --repeats: the ratio's range over the windows (slowest against fastest, and the reverse)
            "throughput_ratio_range": None
            if "windows" not in run or "windows" not in base
            else [
                min(w["tokens_per_s"] for w in run["windows"]) / max(w["tokens_per_s"] for w in base["windows"]),
                max(w["tokens_per_s"] for w in run["windows"]) / min(w["tokens_per_s"] for w in base["windows"]),
            ],
            "throughput_ratio_to_bf16_stream": run["tokens_per_s"] / runs["bf16-stream"]["tokens_per_s"]
            if execution == "stream" and "bf16-stream" in runs
            else None,
            "gpu_peak_gib": peak,
            "quantized_weights_gib": quant_gib,
            "gpu_peak_bound_gib": bound,
            "gpu_peak_within_bound": None if peak is None else peak <= bound,
            "max_rel_diff_raw_sums_vs_bf16": _max_rel(a["layers"], b["layers"]),
            "plan_overlap_25": plan_overlap(a, b, 0.25),
            "plan_overlap_50": plan_overlap(a, b, 0.5),
            **score_difference(a, b),
        }
    result["seconds_total"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
