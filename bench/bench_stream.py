"""Streamed vs in-memory scoring on a real-width Qwen3-VL-30B-A3B skeleton (random weights).

1. Writes a checkpoint with the real tensor names, shapes and hub on-disk layout of Qwen3-VL-30B-A3B
   (H=2048, 128 experts of I=768, top-8, 32 heads / 4 KV heads, vocab 151936, the 27-block vision
   tower with deepstack), `--layers` decoder layers (default 12), bf16, in 4 GB shards, plus a
   processor (the tiny byte-level tokenizer, the real image processor sizes). On a GPU the random
   weights are made there (fast), then saved.
2. Scores it twice, each in its own process, on the same calibration batches (text + images) with the
   same default candidate-plan measurement (REAP_CRITERION=auto, `--eval-samples`, default 16: every
   criterion x policy x ratio, the random plans and the merge candidate, REAP_EVAL_MERGE's default; the
   greedy and swap searches off in both unless `--greedy`: streamed, they take one more pass over the
   weights per step / measurement):
     memory   the whole model on the GPU, no cap
     stream   REAP_EXECUTION=stream with the GPU capped by torch.cuda.set_per_process_memory_fraction
              to one third of the model's weight bytes: statistics and every candidate plan in one pass
   and reports the throughput (calibration tokens / (scoring + plan measurement seconds)) of each and the
   ratio stream / memory, the streamed run's seconds per phase (capture, layer loads, calibration
   compute, plan streams, merge candidate, head), GPU peak (max over the stage's phases of max_memory_allocated) and CPU
   peak RSS against the bounds of docs/design.md ("Memory bounds"), the per-layer quantities the
   extrapolation in docs/benchmarks.md uses, and the largest relative difference of the raw sums and of
   the candidate table between the two metadata files.
3. With `--search-layers N` (> 0): the same pair of runs on an N-layer skeleton and `--search-samples` rows
   with the default searches on (greedy + swap, REAP_SEARCH_BUDGET's default), within what is left of
   `--budget-s` seconds (else reported as not completed): what the searches cost streamed (passes, seconds)
   against memory, and the two candidate tables (greedy, swap and merge rows included) compared.

Usage:  python bench/bench_stream.py [--layers 12] [--samples 2200] [--seq-len 512] [--search-layers 2]
                                     [--budget-s 270] [--work DIR] [--out result.json]
        python bench/bench_stream.py --small      # CPU smoke test (tiny widths, a few samples)
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REAL = dict(  # Qwen3-VL-30B-A3B-Instruct's config.json
    text=dict(
        hidden_size=2048,
        intermediate_size=6144,
        moe_intermediate_size=768,
        num_attention_heads=32,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=128,
        num_experts_per_tok=8,
        vocab_size=151936,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20]},
    ),
    vision=dict(
        depth=27,
        hidden_size=1152,
        intermediate_size=4304,
        num_heads=16,
        out_hidden_size=2048,
        num_position_embeddings=2304,
        deepstack_visual_indexes=[8, 16, 24],
    ),
)
SMALL = dict(
    text=dict(
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=16,
        num_experts_per_tok=4,
        vocab_size=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2]},
    ),
    vision=dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        out_hidden_size=64,
        num_position_embeddings=256,
        deepstack_visual_indexes=[0],
    ),
)


def make_checkpoint(out: Path, sizes: dict, layers: int, dtype: torch.dtype, device: str = "cpu") -> Path:
    """The skeleton checkpoint: the model class with random weights, saved in the hub layout. The weights are
    drawn on `device` (on a GPU in seconds; 12 real-width layers took 315 s on 16 CPU cores)."""
    from transformers import (
        Qwen2VLImageProcessor,
        Qwen3VLMoeConfig,
        Qwen3VLMoeForConditionalGeneration,
        Qwen3VLProcessor,
        Qwen3VLVideoProcessor,
    )

    from reap_vlm.tiny import CHAT_TEMPLATE, make_tokenizer

    if (out / "config.json").is_file():
        return out
    tokenizer = make_tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>")}
    ids.update({t: tokenizer.convert_tokens_to_ids(t) for t in ("<|vision_start|>", "<|vision_end|>", "<|im_end|>")})
    config = Qwen3VLMoeConfig(
        text_config=dict(
            **sizes["text"],
            num_hidden_layers=layers,
            max_position_embeddings=32768,
            initializer_range=0.02,
            tie_word_embeddings=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(
            **sizes["vision"], patch_size=16, spatial_merge_size=2, temporal_patch_size=2, initializer_range=0.02
        ),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3VLMoeForConditionalGeneration._from_config(config, dtype=dtype).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, max_shard_size="4GB")  # hub layout (save_original_format defaults to True)
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the scoring runs are other processes: give them the GPU back
    size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 512}
    processor = Qwen3VLProcessor(
        image_processor=Qwen2VLImageProcessor(patch_size=16, temporal_patch_size=2, merge_size=2, size=size),
        tokenizer=tokenizer,
        video_processor=Qwen3VLVideoProcessor(patch_size=16, temporal_patch_size=2, merge_size=2),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def make_calibration(out: Path, rows: int) -> Path:
    """A JSONL calibration file of `rows` rows: the built-in sets' calibration rows (text, and image
    questions with their images copied beside it), the sets in turn, each pass over them marked "[copy c]" so that
    every row is distinct. (The built-in sets alone hold about 210 k tokens at 512 tokens per sample with
    the byte-level tokenizer: too few for the benchmark.) The reap stage splits it by content hash
    (1 in 5 rows held out), so the calibration split gets about 4/5 of the rows."""
    import shutil

    from reap_vlm.calibration import BUILTIN, CALIBRATION_DIR

    path = out / "calibration.jsonl"
    if path.is_file():
        return path
    out.mkdir(parents=True, exist_ok=True)
    per_set: list[list[tuple[str, dict]]] = []
    for name in BUILTIN:
        folder = CALIBRATION_DIR / name
        if not (folder / "calib.jsonl").is_file():
            continue
        for sub in folder.iterdir():
            if sub.is_dir():
                shutil.copytree(sub, out / name / sub.name, dirs_exist_ok=True)
        per_set.append([(name, json.loads(line)) for line in (folder / "calib.jsonl").read_text().splitlines() if line])
    # the sets in turn, so that any prefix of the file mixes text and images
    source = [rows[i] for i in range(max(map(len, per_set))) for rows in per_set if i < len(rows)]
    lines = []
    for i in range(rows):
        name, row = source[i % len(source)]
        row = json.loads(json.dumps(row))
        copy = i // len(source)
        mark = f"[copy {copy}] " if copy else ""
        if "text" in row:
            row["text"] = mark + row["text"]
        for message in row.get("messages", []):
            if isinstance(message.get("content"), str):
                message["content"] = mark + message["content"]
                mark = ""
                continue
            for item in message["content"]:
                if item.get("type") == "image":
                    item["image"] = f"{name}/{item.get('image') or item.get('path')}"
                    item.pop("path", None)
                elif item.get("type") == "text" and mark:
                    item["text"], mark = mark + (item.get("text") or ""), ""
        lines.append(json.dumps(row))
    path.write_text("\n".join(lines) + "\n")
    return path


def weight_bytes(model_dir: Path) -> int:
    from reap_vlm.checkpoint import inspect_checkpoint

    return sum(t.nbytes for t in inspect_checkpoint(model_dir).tensors.values())


def child(args) -> None:
    """One scoring run in this process; writes <work>/<mode>.json."""
    from reap_vlm.reap import score
    from reap_vlm.settings import ReapSettings, load

    model_dir = args.work / args.model
    cuda = torch.cuda.is_available() and not args.small
    cap = None
    if cuda and args.child == "stream":
        total = torch.cuda.get_device_properties(0).total_memory
        cap = weight_bytes(model_dir) / 3
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
    out = args.work / f"{args.child}{args.tag}"
    argv = ["--model-path", str(model_dir), "--output-path", str(out)]
    argv += ["--device", "cuda" if cuda else "cpu", "--dtype", "bfloat16" if cuda else "float32"]
    argv += ["--calibration", str(args.work / "calibration" / "calibration.jsonl")]
    argv += ["--max-samples", str(args.samples), "--max-seq-len", str(args.seq_len)]
    argv += ["--batch-size", str(args.batch_size), "--eval-samples", str(args.eval_samples), "--no-plots"]
    argv += ["--execution", args.child, "--stream-cache-gb", str(args.cache_gb)]
    argv += [] if args.greedy else ["--no-greedy-search"]
    if args.small:
        argv += ["--min-pixels", "1024", "--max-pixels", "16384"]
    if out.exists():
        import shutil

        shutil.rmtree(out)  # this bench's own output folder of an earlier run
    settings = load(ReapSettings, argv, {})
    started = time.perf_counter()
    meta = score(settings)
    seconds = time.perf_counter() - started
    tokens = meta["calibration"]["tokens"]
    phases = meta["scoring"].get("phases", {})
    work = sum(phases.get(p, {}).get("seconds", 0.0) for p in ("scoring", "plans"))
    peaks = [p["gpu_peak_gib"] for p in phases.values() if "gpu_peak_gib" in p]
    rows = meta.get("candidates", {}).get("rows", [])
    result = {
        "mode": args.child,
        "policies": sorted({r["policy"] for r in rows}),
        "chosen": meta["plan"].get("chosen_by"),
        "seconds_stage": round(seconds, 2),
        "phases": phases,
        "execution": meta["scoring"]["execution"],
        "tokens": tokens,
        "tokens_per_s": (tokens["text"] + tokens["image"]) / max(work, 1e-9),
        "plans_evaluated": meta.get("candidates", {}).get("plans_evaluated", 0),
        "gpu_peak_gib": max(peaks) if peaks else None,
        "gpu_cap_gib": cap / 2**30 if cap else None,
        "cpu_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30,
        "metadata": str(settings.metadata_file),
    }
    (args.work / f"{args.child}{args.tag}.json").write_text(json.dumps(result, indent=1))


TIMED = ("seconds", "greedy_seconds", "merge_seconds")


def _max_rel(a, b) -> float:
    """The largest relative difference of the numbers of two JSON trees (timings left out); inf where their
    shapes differ (a key or a row in one only)."""
    return _max_rel_at(a, b)[0]


def _max_rel_at(a, b, path: str = "") -> tuple[float, str]:
    """(_max_rel, where it is: a path of keys and list indices, e.g. rows[42].loss)."""
    if isinstance(a, dict):
        if not isinstance(b, dict) or set(a) - set(TIMED) != set(b) - set(TIMED):
            return math.inf, path
        parts = [_max_rel_at(a[k], b[k], f"{path}.{k}") for k in a if k not in TIMED]
        return max(parts, default=(0.0, path))
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return math.inf, path
        return max(
            (_max_rel_at(x, y, f"{path}[{i}]") for i, (x, y) in enumerate(zip(a, b, strict=True))), default=(0.0, path)
        )
    if isinstance(a, float) and isinstance(b, float) and math.isfinite(a) and math.isfinite(b):
        return abs(a - b) / max(abs(a), abs(b), 1e-30), path
    return 0.0, path


def _differing_rows(a: dict, b: dict) -> list[str]:
    """The candidate rows (criterion/policy at ratio) whose numbers differ by more than 1e-5 between the runs."""
    out = []
    for x, y in zip(a.get("rows", []), b.get("rows", []), strict=False):
        if _max_rel(x, y) > 1e-5:
            out.append(
                f"{x['criterion']}/{x['policy']} at {x['ratio']}: {_max_rel_at(x, y)[0]:.2e} at {_max_rel_at(x, y)[1]}"
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument(
        "--samples", type=int, default=2200, help="rows of the calibration JSONL (text + images; 4/5 calibrate)"
    )
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=16, help="held-out samples for the candidate plans")
    parser.add_argument("--cache-gb", type=float, default=32.0, help="REAP_STREAM_CACHE_GB of the streamed run")
    parser.add_argument("--work", type=Path, default=Path("bench_stream_work"))
    parser.add_argument("--small", action="store_true", help="tiny widths on the CPU (a smoke test)")
    parser.add_argument(
        "--greedy", action="store_true", help="also the greedy search (in both runs; streamed: one pass per step)"
    )
    parser.add_argument(
        "--search-layers", type=int, default=0, help="also the default searches on a skeleton of this many layers"
    )
    parser.add_argument("--search-samples", type=int, default=120, help="calibration rows of the search runs")
    parser.add_argument("--budget-s", type=float, default=270.0, help="the search runs stop when this is spent")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=("memory", "stream"), help=argparse.SUPPRESS)
    parser.add_argument("--model", default="model", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.layers, args.samples, args.seq_len, args.batch_size = min(args.layers, 4), min(args.samples, 40), 96, 3
        args.eval_samples = min(args.eval_samples, 2)
    if args.child:
        child(args)
        return
    started = time.perf_counter()
    sizes = SMALL if args.small else REAL
    dtype = torch.float32 if args.small else torch.bfloat16
    make_calibration(args.work / "calibration", args.samples)
    device = "cuda" if torch.cuda.is_available() and not args.small else "cpu"
    model_dir = make_checkpoint(args.work / "model", sizes, args.layers, dtype, device)
    built = time.perf_counter() - started
    print(f"checkpoint {model_dir}: {weight_bytes(model_dir) / 2**30:.2f} GiB ({time.perf_counter() - started:.0f} s)")
    runs = _pair(args, "model", "", args.layers, args.samples, args.greedy)
    from reap_vlm import metadata

    a, b = (metadata.read(Path(runs[m]["metadata"])) for m in ("memory", "stream"))
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.small else "cpu",
        "layers": args.layers,
        "weights_gib": weight_bytes(model_dir) / 2**30,
        "seconds_checkpoint": round(built, 1),
        "runs": runs,
        "throughput_ratio": runs["stream"]["tokens_per_s"] / runs["memory"]["tokens_per_s"],
        "max_rel_diff_raw_sums": _max_rel(a["layers"], b["layers"]),
        "max_rel_diff_candidates": _max_rel(a.get("candidates", {}), b.get("candidates", {})),
        "max_rel_diff_candidates_at": _max_rel_at(a.get("candidates", {}), b.get("candidates", {}))[1]
        if _max_rel(a.get("candidates", {}), b.get("candidates", {})) > 0
        else None,
        "candidate_rows_differing": _differing_rows(a.get("candidates", {}), b.get("candidates", {})),
        "same_plan": a["plan"]["kept_per_block"] == b["plan"]["kept_per_block"]
        and all(a["layers"][k]["kept"] == b["layers"][k]["kept"] for k in a["layers"]),
        "merge_row": {m: "merge" in runs[m]["policies"] for m in runs},
    }
    # docs/design.md, "Memory bounds": GPU <= max(outer parts + 1 GiB, 2 x largest layer + chunk budget +
    # 1 GiB) + the GPU tier of the cache; CPU <= the process' RSS before any weight was read + the batches'
    # inputs + RAM tier + captured layer arguments + 2 layers + outer parts + merge statistics + 0.5 GiB
    mem = runs["stream"]["execution"]["memory"]
    chunk_gib = 768 / 1024
    result["bounds_gib"] = {
        **mem,
        "gpu_stream": max(mem["outer_parts_gib"] + 1, mem["reserve_gib"]) + mem["gpu_cache_peak_gib"],
        "cpu_stream": mem["cpu_bound_gib"],  # StreamedModel.cpu_bound_bytes: the baseline RSS and the terms
        "chunk_gib": chunk_gib,
    }
    result["within_bounds"] = {
        "gpu": runs["stream"]["gpu_peak_gib"] is None
        or runs["stream"]["gpu_peak_gib"] <= result["bounds_gib"]["gpu_stream"],
        "cpu": runs["stream"]["cpu_peak_rss_gib"] <= result["bounds_gib"]["cpu_stream"],
    }
    # what docs/benchmarks.md extrapolates from: per decoder layer and per calibration token
    seconds = runs["stream"]["execution"].get("seconds", {})
    n_tokens = runs["stream"]["tokens"]["text"] + runs["stream"]["tokens"]["image"]
    result["per_layer"] = {
        "load_s": seconds.get("load", 0.0) / args.layers,
        "calibration_s_per_mtok": seconds.get("compute", 0.0) / args.layers / max(n_tokens, 1) * 1e6,
        "plans_s": seconds.get("plans", 0.0) / args.layers,
        "merge_s": seconds.get("merge", 0.0) / args.layers,  # the merge candidate: merged experts + its stream
        "capture_s_per_mtok": seconds.get("capture", 0.0) / max(n_tokens, 1) * 1e6,
        "head_s": seconds.get("head", 0.0),
        "hidden_bytes_per_token": sizes["text"]["hidden_size"] * (4 if args.small else 2),
    }
    if args.search_layers > 0:
        if args.out:  # the main comparison is kept if the search part is cut off from outside
            args.out.write_text(json.dumps(result, indent=1))
        result["searches"] = _searches(args, sizes, dtype, device, started)
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def _pair(args, model: str, tag: str, layers: int, samples: int, greedy: bool, timeout=None) -> dict:
    """The memory and the stream run of one skeleton, each in its own process."""
    runs = {}
    for mode in ("memory", "stream"):
        cmd = [sys.executable, __file__, "--child", mode, "--work", str(args.work), "--layers", str(layers)]
        cmd += ["--samples", str(samples), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size)]
        cmd += ["--cache-gb", str(args.cache_gb), "--eval-samples", str(args.eval_samples)]
        cmd += ["--model", model, f"--tag={tag}"]
        cmd += ["--small"] if args.small else []
        cmd += ["--greedy"] if greedy else []
        left = None if timeout is None else timeout()
        if left is not None and left <= 0:
            raise subprocess.TimeoutExpired(cmd, 0)
        subprocess.run(cmd, check=True, timeout=left)
        runs[mode] = json.loads((args.work / f"{mode}{tag}.json").read_text())
    return runs


def _searches(args, sizes, dtype, device, started) -> dict:
    """Part 3 of the module docstring: the default searches on `--search-layers` layers, memory vs stream."""
    from reap_vlm import metadata

    layers = args.search_layers
    out: dict = {"layers": layers, "calibration_rows": args.search_samples}
    left = args.budget_s - (time.perf_counter() - started)
    if left < 60:  # two stage runs of a few layers take more than a minute at real width
        out.update(completed=False, why=f"not started: {left:.0f} s of --budget-s {args.budget_s:g} s were left")
        return out
    try:
        make_checkpoint(args.work / f"model{layers}", sizes, layers, dtype, device)
        make_calibration(args.work / "calibration", args.samples)
        runs = _pair(
            args,
            f"model{layers}",
            f"-search{layers}",
            layers,
            args.search_samples,
            True,
            lambda: args.budget_s - (time.perf_counter() - started),
        )
    except subprocess.TimeoutExpired:
        out["completed"] = False
        out["why"] = f"not completed within --budget-s {args.budget_s:g} s"
        return out
    a, b = (metadata.read(Path(runs[m]["metadata"])) for m in ("memory", "stream"))
    rows = a.get("candidates", {}).get("rows", [])
    out.update(
        completed=True,
        runs={
            m: {k: r[k] for k in ("seconds_stage", "tokens", "tokens_per_s", "plans_evaluated", "policies", "chosen")}
            | {"phases": {p: v.get("seconds") for p, v in r["phases"].items()}, "passes": r["execution"].get("passes")}
            for m, r in runs.items()
        },
        searches={r["policy"]: r["search"].get("evaluations") for r in rows if r["policy"] in ("greedy", "swap")},
        max_rel_diff_candidates=_max_rel(a.get("candidates", {}), b.get("candidates", {})),
        same_plan=a["plan"] == b["plan"],
    )
    return out


if __name__ == "__main__":
    main()
