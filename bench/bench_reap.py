"""The reap stage as a user runs it, on a real-width Qwen3-VL-30B-A3B skeleton, beside a plain forward.

1. Builds (or reuses) the skeleton of bench_stream.py: real tensor names, shapes and hub layout of
   Qwen3-VL-30B-A3B, `--layers` decoder layers, random bf16 weights, a processor.
2. For each calibration set — `text`: a JSONL of text samples of at least --seq-len tokens each
   (passages of the built-in text sets joined), --text-samples of them (default 1024 × 512 tokens);
   `combined`: the built-in combined set (text + images), --combined-samples —
   a plain forward of the very batches the stage builds (the model as loaded, no hooks), timed with and
   without the LM head (logits_to_keep=1), and the observer of each mode alone in the same warm loop;
   then `reap_vlm.reap.score` (what reap.py runs, --stage-repeat times) in every
   --modes scoring mode. The stage records wall time, tokens/s and GPU peak per phase (load, data,
   scoring, plans) in the metadata; this script reads them back.
3. The candidate-plan measurement (REAP_EVAL_SAMPLES, default 16) runs in the --plans-in runs only
   (default: full mode on combined, the defaults a user gets); the other runs pass --eval-samples 0.
4. --profile N: for each set, N batches of the plain forward and of every mode's observed forward under
   the torch profiler, after every timing (a process that has run the profiler launches kernels more
   slowly); the tables (by self CUDA / CPU time) are written to the --work folder.

Prints one JSON result and a table of the targets (docs/benchmarks.md, "Whole-model scoring").

Usage:  python bench/bench_reap.py [--layers 12] [--modes router,full] [--sets text,combined] [--work DIR]
                                  [--profile 0] [--out result.json]
        python bench/bench_reap.py --small      # CPU smoke test (tiny widths, a few samples)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_stream import REAL, SMALL, make_checkpoint, weight_bytes  # noqa: E402 - the one skeleton builder


def text_jsonl(path: Path, samples: int, seq_len: int, seed: int = 0) -> Path:
    """`samples` text samples for calibration (plus the held-out fifth the content hash splits off), each
    long enough for seq_len tokens of the skeleton's tokenizer: passages of the built-in text sets joined."""
    passages = []
    for name in ("general", "code", "math", "writing"):
        for line in (ROOT / "calibration" / name / "calib.jsonl").read_text().splitlines():
            passages.append(json.loads(line)["text"])
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(int(samples * 1.35) + 8):  # about 1 in 5 goes to the evaluation split
            text, parts = f"[{i}] ", []
            while len(text) < 5 * seq_len:
                parts.append(rng.choice(passages))
                text = f"[{i}] " + "\n\n".join(parts)
            f.write(json.dumps({"text": text}) + "\n")
    return path


def settings_for(args, spec: str, samples: int, mode: str, eval_samples: int, out: Path, extra=()):
    from reap_vlm.settings import ReapSettings, load

    cuda = torch.cuda.is_available() and not args.small
    argv = ["--model-path", str(args.work / "model"), "--output-path", str(out)]
    argv += ["--device", "cuda" if cuda else "cpu", "--dtype", "bfloat16" if cuda else "float32"]
    argv += ["--calibration", spec, "--max-samples", str(samples), "--max-seq-len", str(args.seq_len)]
    argv += ["--batch-size", str(args.batch_size), "--eval-samples", str(eval_samples), "--no-plots"]
    argv += ["--scoring-mode", mode, "--execution", "memory"]
    if args.small:
        argv += ["--min-pixels", "1024", "--max-pixels", "16384"]
    return load(ReapSettings, argv + list(extra), {})


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _model_and_batches(settings):
    from reap_vlm.loading import load_model
    from reap_vlm.reap import _data

    model, processor, _ = load_model(
        settings.model_path,
        device=settings.device,
        dtype=settings.dtype,
        attn_implementation=settings.attn_implementation,
    )
    _, batches, _, _ = _data(settings, processor)  # settings with REAP_EVAL_SAMPLES=0
    return model, batches


def _empty_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plain_forward(settings, args) -> dict:
    """The plain forward of the stage's own batches (reap._data), with and without the LM head, and the
    observer alone in the same warm loop per mode."""
    from reap_vlm.execution.memory import prepare_inputs
    from reap_vlm.moe import find_moe_blocks
    from reap_vlm.observe import Observer

    model, batches = _model_and_batches(settings)
    device = next(model.parameters()).device
    tokens = sum(int((b.modality >= 0).sum()) for b in batches)
    padded = sum(b.modality.numel() for b in batches)
    out = {"batches": len(batches), "tokens": tokens, "padded_positions": padded}
    with torch.inference_mode():
        for b in batches[:2]:  # warm-up (kernels, allocator)
            model(**prepare_inputs(model, b), use_cache=False, logits_to_keep=1)
        for name, keep in (("with_head", 0), ("without_head", 1)):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            _sync(device)
            started = time.perf_counter()
            for b in batches:
                model(**prepare_inputs(model, b), use_cache=False, logits_to_keep=keep)
            _sync(device)
            seconds = time.perf_counter() - started
            out[name] = {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
            if device.type == "cuda":
                out[name]["gpu_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        # the observer alone, warmed up, in the same loop as the plain forward: the hooks' own cost
        blocks = find_moe_blocks(model)
        for mode in args.modes:
            with Observer(model, blocks, mode, settings.chunk_memory_mb) as obs:
                for b in batches[:2]:
                    obs.set_modality(b.modality)
                    model(**prepare_inputs(model, b), use_cache=False, logits_to_keep=1)
                _sync(device)
                started = time.perf_counter()
                for b in batches:
                    obs.set_modality(b.modality)
                    model(**prepare_inputs(model, b), use_cache=False, logits_to_keep=1)
                _sync(device)
                seconds = time.perf_counter() - started
            out[f"observed_{mode}"] = {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
    del model
    _empty_cache()
    return out


def profile_forward(settings, args, profile_dir: Path, label: str) -> None:
    """--profile: the profiler tables of a few batches, plain and observed in each mode. Run after every
    timing: a process that has run the profiler launches kernels more slowly afterwards (seen on the H200:
    the stage's router mode measured 1.71x the plain forward after a profiled loop, 1.02x without one)."""
    from torch.profiler import ProfilerActivity, profile

    from reap_vlm.execution.memory import prepare_inputs
    from reap_vlm.moe import find_moe_blocks
    from reap_vlm.observe import Observer

    model, batches = _model_and_batches(settings)
    device = next(model.parameters()).device
    blocks = find_moe_blocks(model)
    with torch.inference_mode():
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        few = batches[: args.profile]
        for mode in ("plain", *args.modes):
            with contextlib.ExitStack() as stack:
                obs = None
                if mode != "plain":
                    obs = stack.enter_context(Observer(model, blocks, mode, settings.chunk_memory_mb))
                for b in few[:1]:  # warm-up of this mode (compiled epilogues)
                    if obs is not None:
                        obs.set_modality(b.modality)
                    model(**prepare_inputs(model, b), use_cache=False, logits_to_keep=1)
                _sync(device)
                with profile(activities=activities) as prof:
                    for b in few:
                        if obs is not None:
                            obs.set_modality(b.modality)
                        model(**prepare_inputs(model, b), use_cache=False, logits_to_keep=1)
                    _sync(device)
            table = []
            for key in (["self_cuda_time_total"] if device.type == "cuda" else []) + ["self_cpu_time_total"]:
                table.append(f"== {label} {mode}: {len(few)} batches, by {key}\n")
                table.append(prof.key_averages().table(sort_by=key, row_limit=30, max_name_column_width=70))
            (profile_dir / f"profile_{label}_{mode}.txt").write_text("\n".join(table))
    del model
    _empty_cache()


def stage(settings) -> dict:
    from reap_vlm.reap import score

    started = time.perf_counter()
    meta = score(settings)
    return {
        "seconds_stage": round(time.perf_counter() - started, 2),
        "phases": meta["scoring"]["phases"],
        "tokens": meta["calibration"]["tokens"],
        "batches": meta["scoring"]["batches"],
        "plans_evaluated": meta.get("candidates", {}).get("plans_evaluated"),
    }


def targets(result: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    weights = result["weights_gib"]
    for label, run in result["sets"].items():
        plain = run["plain"]["without_head"]["seconds"]
        for mode, r in run["modes"].items():
            s = r["phases"]["scoring"]
            ratio = s["seconds"] / plain
            limit = {"router": 1.10, "full": 4.0}.get(mode)
            met = "-" if limit is None else ("yes" if ratio <= limit else "no")
            observed = run["plain"].get(f"observed_{mode}")
            rows.append(
                (
                    f"{label}, {mode} mode / plain forward (no LM head)",
                    f"{ratio:.2f}x ({s['tokens_per_s']:,.0f} vs {run['plain']['without_head']['tokens_per_s']:,.0f} "
                    f"tokens/s; with LM head {run['plain']['with_head']['tokens_per_s']:,.0f})"
                    + (f"; the observer alone in the warm loop {observed['seconds'] / plain:.2f}x" if observed else ""),
                    f"<= {limit}x" if limit else "-",
                    met,
                )
            )
            peak = max((p.get("gpu_peak_gib", 0.0) for p in r["phases"].values()), default=0.0)
            if peak:
                rows.append(
                    (
                        f"{label}, {mode} mode: GPU peak of the stage",
                        f"{peak:.2f} GiB = weights {weights:.2f} + {peak - weights:.2f}"
                        + (f" (plans {r['phases']['plans']['gpu_peak_gib']:.2f})" if "plans" in r["phases"] else ""),
                        "<= weights + 2 GiB",
                        "yes" if peak <= weights + 2 else "no",
                    )
                )
    sets = result["sets"]
    if "text" in sets and "combined" in sets:
        for mode in sets["text"]["modes"]:
            if mode in sets["combined"]["modes"]:
                t = sets["text"]["modes"][mode]["phases"]["scoring"]["tokens_per_s"]
                c = sets["combined"]["modes"][mode]["phases"]["scoring"]["tokens_per_s"]
                rows.append(
                    (
                        f"{mode} mode: combined / text-only tokens/s",
                        f"{c / t:.2f} ({c:,.0f} vs {t:,.0f})",
                        ">= 0.8",
                        "yes" if c / t >= 0.8 else "no",
                    )
                )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--text-samples", type=int, default=1024)
    parser.add_argument("--combined-samples", type=int, default=1024, help="REAP_MAX_SAMPLES of the combined set")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--modes", default="router,full")
    parser.add_argument("--sets", default="text,combined")
    parser.add_argument("--plans-in", default="combined/full", help="SET/MODE runs that measure the candidates")
    parser.add_argument("--eval-samples", type=int, default=16, help="REAP_EVAL_SAMPLES of those runs")
    parser.add_argument(
        "--plan-args", default="", help="more reap.py options for those runs, e.g. '--criterion reap' (no search)"
    )
    parser.add_argument("--stage-repeat", type=int, default=1, help="run each stage N times (the last is kept)")
    parser.add_argument("--profile", type=int, default=0, help="batches under the torch profiler per set and mode")
    parser.add_argument("--work", type=Path, default=Path("bench_reap_work"))
    parser.add_argument("--small", action="store_true", help="tiny widths on the CPU (a smoke test)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    args.modes = [m for m in args.modes.split(",") if m]
    if args.small:
        args.layers, args.seq_len, args.batch_size = min(args.layers, 2), 64, 4
        args.text_samples, args.combined_samples = min(args.text_samples, 12), min(args.combined_samples, 12)
        args.eval_samples = min(args.eval_samples, 2)
    started = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available() and not args.small
    sizes, dtype = (SMALL, torch.float32) if args.small else (REAL, torch.bfloat16)
    model_dir = make_checkpoint(args.work / "model", sizes, args.layers, dtype, "cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.empty_cache()
    print(f"checkpoint {model_dir}: {weight_bytes(model_dir) / 2**30:.2f} GiB ({time.perf_counter() - started:.0f} s)")
    specs = {
        "text": (str(text_jsonl(args.work / "text.jsonl", args.text_samples, args.seq_len)), args.text_samples),
        "combined": ("combined", args.combined_samples),
    }
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.small else "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "weights_gib": weight_bytes(model_dir) / 2**30,
        "sets": {},
    }
    for label in [s for s in args.sets.split(",") if s]:
        spec, samples = specs[label]
        base = settings_for(args, spec, samples, args.modes[0], 0, args.work / f"{label}-plain")
        run = {"plain": plain_forward(base, args), "modes": {}}
        print(f"{label}: plain forward {json.dumps(run['plain'])}", flush=True)
        for mode in args.modes:
            plans = f"{label}/{mode}" in args.plans_in.split(",")
            evals, extra = (args.eval_samples, args.plan_args.split()) if plans else (0, [])
            out = args.work / f"{label}-{mode}"
            for repeat in range(args.stage_repeat):  # later runs: the process is warm (kernels, compiled code)
                run["modes"][mode] = stage(settings_for(args, spec, samples, mode, evals, out, extra))
                if args.stage_repeat > 1:
                    run["modes"][mode]["repeat"] = repeat + 1
                    print(f"{label} {mode} run {repeat + 1}: {json.dumps(run['modes'][mode]['phases'])}", flush=True)
            print(f"{label} {mode}: {json.dumps(run['modes'][mode]['phases'])}", flush=True)
        result["sets"][label] = run
    if args.profile:
        for label in [s for s in args.sets.split(",") if s]:
            spec, samples = specs[label]
            profile_forward(
                settings_for(args, spec, samples, args.modes[0], 0, args.work / "p"), args, args.work, label
            )
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))
    print("\n| measurement | result | target | met? |\n|---|---|---|---|")
    for row in targets(result):
        print("| " + " | ".join(row) + " |")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
