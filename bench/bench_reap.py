"""The reap stage as a user runs it, on a real-width Qwen3-VL-30B-A3B skeleton, beside a plain forward.

1. Builds (or reuses) the skeleton of bench_stream.py: real tensor names, shapes and hub layout of
   Qwen3-VL-30B-A3B, `--layers` decoder layers, random bf16 weights, a processor.
2. For each calibration set — `text`: a JSONL of text samples of at least --seq-len tokens each
   (passages of the built-in text sets joined), --text-samples of them (default 1024 × 512 tokens);
   `combined`: the built-in combined set (text + images), --combined-samples —
   a plain forward of the very batches the stage builds (the model as loaded, no hooks), timed with and
   without the LM head (logits_to_keep=1), and the observer of each mode alone in the same warm loop
   (for the --observed-merge sets also full mode's observer with the stage's merge statistics);
   then `reap_vlm.reap.score` (what reap.py runs, --stage-repeat times) in every
   --modes scoring mode, each mode on every set in turn (the runs a combined / text-only ratio compares
   follow each other). The stage records wall time, tokens/s and GPU peak per phase (load, data,
   scoring, plans) in the metadata; this script reads them back.
3. The candidate-plan measurement (REAP_EVAL_SAMPLES, default 16) runs in the --plans-in runs only
   (default: full mode on combined, the defaults a user gets); the other runs pass --eval-samples 0.
4. --profile N: for each set, N batches of the plain forward and of every mode's observed forward under
   the torch profiler, in a child process after every timing (a process that has run the profiler
   launches kernels more slowly); per set and mode a summary (GPU and host time per batch, host syncs and
   copies per batch) and the top ops by self CUDA and CPU time, in --profile-out (default: the --work
   folder's profile.txt).
5. --auto SET/MODE: the default plan measurement (REAP_CRITERION auto: every criterion, policy and ratio,
   random plans, merge plans, the greedy and swap searches) as a user gets it — `reap.py` in a child process
   with the bench's settings and no plan options, on its own --auto-layers skeleton — run FIRST (its cost is
   the unknown one), stopped after --auto-budget seconds (or what is left of --budget); its phases (plans
   timed separately) and the searches' seconds go into the result, or, when it was stopped, its last output
   lines with the second each came at (how far it got). The profile runs last, if 30 s of --budget are left.

Prints one JSON result and a table of the targets (docs/benchmarks.md, "Whole-model scoring").

Usage:  python bench/bench_reap.py [--layers 12] [--modes router,full] [--sets text,combined] [--work DIR]
                                  [--profile 0] [--profile-out FILE] [--auto combined/full] [--auto-layers N]
                                  [--auto-budget S] [--budget 280]
                                  [--out result.json]
        python bench/bench_reap.py --small      # CPU smoke test (tiny widths, a few samples)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import itertools
import json
import random
import re
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
    """The model and the batches as the stage has them (reap._load, reap._data, memory.prepare_batches)."""
    from reap_vlm.execution.memory import prepare_batches
    from reap_vlm.reap import _data, _load

    memory = argparse.Namespace(mode="memory")
    model, processor, _ = _load(settings, memory, {}, Path(settings.output_path) / "unused")  # the stage's model
    _, _, batches, _, _ = _data(settings, processor)  # settings with REAP_EVAL_SAMPLES=0
    first = next((b for b in batches if "pixel_values" in b.inputs), None)
    raw = None if first is None else dataclasses.replace(first, inputs=dict(first.inputs))  # as the processor made it
    prepare_batches(model, batches)
    return model, batches, raw


def _empty_cache() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plain_forward(settings, args, label: str) -> dict:
    """The plain forward of the stage's own batches (reap._data), with and without the LM head, and the
    observer alone in the same warm loop per mode."""
    from reap_vlm.execution.memory import prepare_inputs
    from reap_vlm.moe import find_moe_blocks
    from reap_vlm.observe import Observer
    from reap_vlm.reap import merge_collector

    model, batches, raw = _model_and_batches(settings)
    device = next(model.parameters()).device
    tokens = sum(int((b.modality >= 0).sum()) for b in batches)
    padded = sum(b.modality.numel() for b in batches)
    out = {"batches": len(batches), "tokens": tokens, "padded_positions": padded}
    with torch.inference_mode():
        images = [b for b in batches if "pixel_values" in b.inputs]
        # warm-up: one batch of every input shape (kernels, cuDNN attention plans, allocator; the vision tower's
        # too): run 7's combined plain forward, warmed on 3 batches, met most of its 54 batches' shapes for the
        # first time in the timed loop and ran 2.5x the time of the observed loop after it
        shapes = {}
        for b in batches:
            shapes.setdefault(tuple((k, tuple(v.shape)) for k, v in b.inputs.items() if torch.is_tensor(v)), b)
        for b in shapes.values():
            model(**prepare_inputs(model, b), use_cache=False, logits_to_keep=1)
        out["warmup_batches"] = len(shapes)
        if raw is not None:  # the data phase's precomputed inputs against the model computing them, on this device
            mine = model(**prepare_inputs(model, images[0]), use_cache=False, logits_to_keep=1).logits
            own = model(**prepare_inputs(model, raw), use_cache=False, logits_to_keep=1).logits
            out["precomputed_inputs_equal"] = {"batch_rows": len(raw.sample_ids), "logits": torch.equal(mine, own)}
        heads = (("with_head", 0),) if label in args.with_head.split(",") else ()
        for name, keep in (*heads, ("without_head", 1)):
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
        runs = [(mode, None) for mode in args.modes]
        if "full" in args.modes and label in args.observed_merge.split(","):  # full mode's merge statistics' cost
            runs.append(("full", "merge"))
        for mode, merge in runs:
            full = dataclasses.replace(settings, scoring_mode="full")  # the stage's collector, at its defaults
            collector = merge_collector(full, model, blocks, len(batches)) if merge else None
            with Observer(model, blocks, mode, settings.chunk_memory_mb, merge=collector) as obs:
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
            name = f"observed_{mode}" + (f"_{merge}" if merge else "")
            out[name] = {"seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}
    del model
    _empty_cache()
    return out


SYNC_EVENTS = (  # host-side events that wait for the GPU or copy between host and device
    "cudaStreamSynchronize",
    "cudaDeviceSynchronize",
    "cudaEventSynchronize",
    "cudaMemcpyAsync",
    "aten::_local_scalar_dense",
    "aten::nonzero",
)


def _profile_summary(prof, label: str, mode: str, batches: int, cuda: bool) -> str:
    """Per batch: GPU kernel time, host time, kernel launches and the sync / copy events; then the top
    ops by self CUDA and by self CPU time."""
    events = prof.key_averages()
    by_name = {e.key: e for e in events}
    # the kernels' own rows only: an op's row repeats its kernels' time, the "batch" range spans them all
    kernels = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA") and e.key != "batch"]
    gpu_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in kernels)
    host_us = max((e.cpu_time_total for e in events if e.key.startswith("ProfilerStep") or e.key == "batch"), default=0)
    launches = sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel"))
    lines = [f"== {label} {mode}: {batches} batches (per batch below)"]
    lines.append(
        f"GPU kernel time {gpu_us / batches / 1e3:.2f} ms, host wall {host_us / batches / 1e3:.2f} ms, "
        f"kernel launches {launches / batches:.0f}"
    )
    syncs = ", ".join(f"{n} {by_name[n].count / batches:.1f}" for n in SYNC_EVENTS if n in by_name)
    lines.append(f"host syncs and copies: {syncs or 'none'}")
    keys = (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]
    for key in keys:
        lines.append(f"-- top ops by {key}")
        lines.append(events.table(sort_by=key, row_limit=25 if "cuda" in key else 15, max_name_column_width=60))
    return "\n".join(lines) + "\n"


def profile_forward(settings, args, label: str) -> str:
    """--profile: a few batches under the torch profiler, plain and observed in each mode; returns the
    summary text. Runs in a child process after every timing: a process that has run the profiler
    launches kernels more slowly afterwards (seen on the H200: the stage's router mode measured 1.71x the
    plain forward after a profiled loop, 1.02x without one)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from reap_vlm.execution.memory import forward
    from reap_vlm.moe import find_moe_blocks
    from reap_vlm.observe import Observer

    model, batches, _ = _model_and_batches(settings)
    device = next(model.parameters()).device
    blocks = find_moe_blocks(model)
    text = []
    with torch.inference_mode():
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        # text batches are alike; in a mixed set profile the image batches too (they are the slow ones)
        images = [b for b in batches if "pixel_values" in b.inputs]
        plain = [b for b in batches if "pixel_values" not in b.inputs]
        few = plain[: args.profile] + images[: args.profile]
        for mode in ("plain", *args.modes):
            with contextlib.ExitStack() as stack:
                obs = None
                if mode != "plain":
                    obs = stack.enter_context(Observer(model, blocks, mode, settings.chunk_memory_mb))
                for b in few:  # warm-up of this mode and these shapes (compiled epilogues)
                    if obs is not None:
                        obs.set_modality(b.modality)
                    forward(model, b)
                _sync(device)
                with profile(activities=activities) as prof:
                    for b in few:
                        with record_function("batch"):
                            if obs is not None:
                                obs.set_modality(b.modality)
                            forward(model, b)
                            _sync(device)
            text.append(_profile_summary(prof, label, mode, len(few), device.type == "cuda"))
            for b in few:
                kind = "image" if "pixel_values" in b.inputs else "text"
                text.append(f"   batch: {kind}, {tuple(b.modality.shape)}, {int((b.modality >= 0).sum())} tokens")
    del model
    _empty_cache()
    return "\n".join(text)


def _graphs() -> int:
    """Graphs torch.compile has made in this process so far (the epilogues of full mode)."""
    try:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])
    except Exception:
        return -1


def stage(settings) -> dict:
    """reap_vlm.reap.score with the host time of each scoring batch (no sync: the host may run ahead of the
    GPU by a queue of kernels, so the first and the slowest batches stand out, not the GPU time)."""
    from reap_vlm.reap import score

    marks = []
    graphs = _graphs()
    started = time.perf_counter()
    meta = score(settings, on_batch=lambda _i: marks.append(time.perf_counter()))
    gaps = [1e3 * (b - a) for a, b in itertools.pairwise(marks)]
    return {
        "seconds_stage": round(time.perf_counter() - started, 2),
        "phases": meta["scoring"]["phases"],
        "tokens": meta["calibration"]["tokens"],
        "batches": meta["scoring"]["batches"],
        "batch_host_ms": {
            "median": round(sorted(gaps)[len(gaps) // 2], 2) if gaps else None,
            "max": round(max(gaps), 2) if gaps else None,
            # the scoring phase less the steady batches: the first batch, the observer's set-up and export
            "outside_steady_s": round(meta["scoring"]["phases"]["scoring"]["seconds"] - sum(gaps) / 1e3, 3),
        },
        "compiled_graphs": _graphs() - graphs,
        "plans_evaluated": meta.get("candidates", {}).get("plans_evaluated"),
        "greedy_seconds": meta.get("candidates", {}).get("greedy_seconds"),
    }


# a line the stage prints when a part ends: a phase ("plans: 41.2 s, ...") or a progress summary ("... in 3.1 s (")
PART_DONE = re.compile(r"\] \S+ (?:(?:load|data|scoring|plans|write): [\d.]+ s|.* in [\d.]+ s \()")


def auto_plans(args, spec: str, samples: int, mode: str, seconds: float, model_dir: Path) -> dict:
    """The default plan measurement as a user runs it: reap.py in a child process (cold: loading and the
    compiled epilogues included), the bench's settings, REAP_EVAL_SAMPLES and the plan options at their
    defaults, on `model_dir`, stopped after `seconds`. Its output lines are kept with the second each came
    at (WORK/auto-MODE-MODEL.log): a run stopped early reports the last of them, i.e. how far it got."""
    import subprocess
    import threading

    out = args.work / f"auto-{mode}-{model_dir.name}"
    settings = settings_for(args, spec, samples, mode, 0, out)
    argv = [sys.executable, "-u", str(ROOT / "reap.py"), "--model-path", str(model_dir)]
    argv += ["--output-path", str(out), "--device", settings.device, "--dtype", settings.dtype]
    argv += ["--calibration", spec, "--max-samples", str(samples), "--max-seq-len", str(args.seq_len)]
    argv += ["--batch-size", str(args.batch_size), "--scoring-mode", mode, "--execution", "memory", "--no-plots"]
    argv += ["--verbose"] + (["--min-pixels", "1024", "--max-pixels", "16384"] if args.small else [])
    started = time.perf_counter()
    lines: list[str] = []
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read() -> None:
        for line in child.stdout:
            lines.append(f"[{time.perf_counter() - started:6.1f} s] {line.rstrip()}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        child.wait(timeout=max(seconds, 1))
    except subprocess.TimeoutExpired:
        child.kill()  # the child this function started, by its handle
        child.wait()
    reader.join(timeout=5)
    log = args.work / f"auto-{mode}-{model_dir.name}.log"
    log.write_text("\n".join(lines) + "\n")
    result = {"seconds": round(time.perf_counter() - started, 1), "returncode": child.returncode, "log": str(log)}
    if child.returncode != 0:
        if child.returncode < 0:
            result["stopped_after_s"] = round(seconds, 1)
        # how far it got: the stage prints a line as each part ends (phases, every progress summary)
        said = [line for line in lines if line.split("] ", 1)[-1].strip()]
        return {
            **result,
            "parts_done": [line for line in said if PART_DONE.search(line)][-16:],
            "last_lines": said[-6:],
        }
    meta = json.loads((out / "reap_metadata.json").read_text())
    candidates = meta.get("candidates", {})
    result["phases"] = meta["scoring"]["phases"]
    result["plans_evaluated"] = candidates.get("plans_evaluated")
    result["greedy_seconds"] = candidates.get("greedy_seconds")  # the searches (greedy, swap)
    result["merge_seconds"] = candidates.get("merge_seconds")
    result["measure_seconds"] = candidates.get("seconds")
    result["chosen_by"] = meta["plan"].get("chosen_by")
    result["notes"] = candidates.get("notes")  # e.g. why the greedy or the swap search was skipped
    return result


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
                    "tokens/s"
                    + (
                        f"; with LM head {run['plain']['with_head']['tokens_per_s']:,.0f}"
                        if "with_head" in run["plain"]
                        else ""
                    )
                    + ")"
                    + (f"; the observer alone in the warm loop {observed['seconds'] / plain:.2f}x" if observed else "")
                    + (
                        f", with merge statistics {run['plain']['observed_full_merge']['seconds'] / plain:.2f}x"
                        if mode == "full" and "observed_full_merge" in run["plain"]
                        else ""
                    ),
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
    for label, run in sets.items():
        check = run["plain"].get("precomputed_inputs_equal")
        if check:
            rows.append(
                (
                    f"{label}: logits with the data phase's vision inputs = the model's own",
                    f"{'equal' if check['logits'] else 'DIFFERENT'} (an image batch of {check['batch_rows']} rows)",
                    "bit for bit",
                    "yes" if check["logits"] else "no",
                )
            )
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


def _commit() -> str | None:
    import subprocess

    try:
        done = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %cI"], capture_output=True, text=True)
        return done.stdout.strip() or None
    except OSError:
        return None


def _child(args, extra: list[str], seconds: float):
    """This script again in a child process (the profiler must not touch the timed process)."""
    import subprocess

    argv = [sys.executable, str(Path(__file__).resolve()), *[a for a in sys.argv[1:]], *extra]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=max(seconds, 1), check=False)
    except subprocess.TimeoutExpired:
        return f"timed out after {seconds:.0f} s"
    return None if done.returncode == 0 else "failed: " + " | ".join(done.stderr.strip().splitlines()[-4:])


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
    parser.add_argument(
        "--observed-merge", default="", help="sets whose warm loop also runs full mode's observer with merge statistics"
    )
    parser.add_argument("--with-head", default="text", help="sets whose plain forward is also timed with the LM head")
    parser.add_argument("--profile", type=int, default=0, help="batches per kind (text, image) under the profiler")
    parser.add_argument("--profile-out", type=Path, help="the profile summary (default: WORK/profile.txt)")
    parser.add_argument("--auto", default="", help="SET/MODE: time the default plan measurement (reap.py, a child)")
    parser.add_argument("--auto-layers", type=int, default=0, help="decoder layers of --auto's skeleton (0: --layers)")
    parser.add_argument(
        "--budget", type=float, default=280.0, help="seconds for everything (--auto and --profile stop at it)"
    )
    parser.add_argument(
        "--auto-budget", type=float, default=0.0, help="at most this many seconds for --auto (0: the budget)"
    )
    parser.add_argument("--profile-child", type=Path, help=argparse.SUPPRESS)
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
    device = "cuda" if cuda else "cpu"
    model_dir = make_checkpoint(args.work / "model", sizes, args.layers, dtype, device)
    if cuda:
        torch.cuda.empty_cache()
    specs = {
        "text": (str(text_jsonl(args.work / "text.jsonl", args.text_samples, args.seq_len)), args.text_samples),
        "combined": ("combined", args.combined_samples),
    }
    labels = [s for s in args.sets.split(",") if s]
    if args.profile_child:  # the child of --profile: only the profiler tables
        text = []
        for label in labels:
            spec, samples = specs[label]
            settings = settings_for(args, spec, samples, args.modes[0], 0, args.work / "p")
            text.append(profile_forward(settings, args, label))
        args.profile_child.write_text("\n".join(text))
        return
    print(f"checkpoint {model_dir}: {weight_bytes(model_dir) / 2**30:.2f} GiB ({time.perf_counter() - started:.0f} s)")
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.small else "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "weights_gib": weight_bytes(model_dir) / 2**30,
        "commit": _commit(),
        "sets": {},
    }

    def save() -> None:  # after every part: a run cut short keeps what it measured
        result["seconds"] = round(time.perf_counter() - started, 1)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    if args.auto:  # first: its cost is the unknown one, and the budget must not skip it
        label, mode = args.auto.split("/")
        spec, samples = specs[label]
        auto_dir = model_dir
        if args.auto_layers:  # its own skeleton: the search's cost grows with the layers it searches over
            auto_dir = make_checkpoint(args.work / f"model-{args.auto_layers}", sizes, args.auto_layers, dtype, device)
            if cuda:
                torch.cuda.empty_cache()
        left = args.budget - (time.perf_counter() - started)
        seconds = min(left, args.auto_budget) if args.auto_budget else left
        timed = (
            auto_plans(args, spec, samples, mode, seconds, auto_dir)
            if seconds >= 30
            else {"skipped": f"{seconds:.0f} s"}
        )
        result["auto"] = {"set": label, "mode": mode, "layers": args.auto_layers or args.layers, **timed}
        print(f"auto plans: {json.dumps(result['auto'])}", flush=True)
        save()
    # the plain forwards of every set, then each mode on every set in turn: the runs that the combined /
    # text-only ratios compare follow each other (the same GPU state: clocks, temperature, allocator)
    for label in labels:
        spec, samples = specs[label]
        base = settings_for(args, spec, samples, args.modes[0], 0, args.work / f"{label}-plain")
        result["sets"][label] = {"plain": plain_forward(base, args, label), "modes": {}}
        print(f"{label}: plain forward {json.dumps(result['sets'][label]['plain'])}", flush=True)
        save()
    for mode in args.modes:
        for label in labels:
            spec, samples = specs[label]
            run = result["sets"][label]
            plans = f"{label}/{mode}" in args.plans_in.split(",")
            evals, extra = (args.eval_samples, args.plan_args.split()) if plans else (0, [])
            out = args.work / f"{label}-{mode}"
            for repeat in range(args.stage_repeat):  # later runs: the process is warm (kernels, compiled code)
                run["modes"][mode] = stage(settings_for(args, spec, samples, mode, evals, out, extra))
                if args.stage_repeat > 1:
                    run["modes"][mode]["repeat"] = repeat + 1
                    print(f"{label} {mode} run {repeat + 1}: {json.dumps(run['modes'][mode]['phases'])}", flush=True)
            print(f"{label} {mode}: {json.dumps(run['modes'][mode])}", flush=True)
            save()
    if args.profile:
        path = args.profile_out or args.work / "profile.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        left = args.budget - (time.perf_counter() - started)
        enough = left >= 30 or args.small
        result["profile"] = (_child(args, ["--profile-child", str(path)], left) or str(path)) if enough else "skipped"
        print(f"profile: {result['profile']}", flush=True)
        save()
    save()
    print(json.dumps(result, indent=1))
    print("\n| measurement | result | target | met? |\n|---|---|---|---|")
    for row in targets(result):
        print("| " + " | ".join(row) + " |")
    print(f"\ncommand: python {' '.join(sys.argv)}")


if __name__ == "__main__":
    main()
