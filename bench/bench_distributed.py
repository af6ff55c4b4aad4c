"""Data-parallel scaling of the reap stage: 1 rank vs N ranks on the real-width Qwen3-VL-30B-A3B skeleton.

For every calibration set (--sets: `mixed`, the default: the --text-samples long text samples below plus
every image of the built-in `vision` and `tasks` sets, text + image calibration of >= 0.5 M tokens at the
defaults; `text`: a JSONL of --text-samples samples of at least --seq-len tokens; `combined`: the built-in
text + image set, --combined-samples), every scoring mode (--modes) and every
rank count (--ranks, default 1,2) the reap stage runs as a user starts it:
`python -m reap_vlm.distributed --standalone --nproc-per-node N reap.py ...` (torchrun; one rank per GPU,
REAP_DEVICE=auto -> cuda:LOCAL_RANK), in --execution memory or stream. The stage records wall time,
tokens/s and GPU peak per phase (rank 0's) in the metadata; this script reads them back and reports

  tokens/s of the scoring phase (it ends when the slowest rank has handed in its sums, so it is the job's),
  scaling efficiency = tokens/s(N) / (N x tokens/s(1))   (target >= 0.85 from 1 to 2 GPUs, full mode),
  GPU peak of rank 0, and
  equality of the N-rank metadata with the 1-rank one: counts, tokens and max |f| exact, the worst relative
  difference of the other sums (guaranteed <= 1e-9), the plan and the candidate table identical.

The skeleton is bench_stream.py's (random bf16 weights, real names and shapes, --layers decoder layers).

Usage:  python bench/bench_distributed.py [--ranks 1,2] [--modes full,router] [--sets mixed,text,combined]
                                          [--layers 12] [--execution memory] [--work DIR] [--out result.json]
        python bench/bench_distributed.py --small      # CPU smoke test: tiny widths, gloo, 1 and 2 CPU ranks
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_reap import text_jsonl  # noqa: E402 - the same long text samples
from bench_stream import REAL, SMALL, make_checkpoint, weight_bytes  # noqa: E402 - the one skeleton builder


def argv_for(args, spec: str, samples: int, mode: str, eval_samples: int, out: Path) -> list[str]:
    cuda = torch.cuda.is_available() and not args.small
    argv = ["--model-path", str(args.work / "model"), "--output-path", str(out)]
    argv += ["--device", "auto" if cuda else "cpu", "--dtype", "bfloat16" if cuda else "float32"]
    argv += ["--calibration", spec, "--max-samples", str(samples), "--max-seq-len", str(args.seq_len)]
    argv += ["--batch-size", str(args.batch_size), "--eval-samples", str(eval_samples), "--no-plots"]
    argv += ["--scoring-mode", mode, "--execution", args.execution, "--merge-stats-mb", "0"]
    if args.small:
        argv += ["--min-pixels", "1024", "--max-pixels", "16384"]
    return argv


def launch(ranks: int, argv: list[str]) -> float:
    """The stage with `ranks` ranks on this node; its wall time (start-up included)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    cmd = [sys.executable, "-m", "reap_vlm.distributed", "--standalone", f"--nproc-per-node={ranks}", "reap.py"]
    started = time.perf_counter()
    subprocess.run([*cmd, *argv], cwd=ROOT, env=env, check=True)
    return time.perf_counter() - started


def compare(one: dict, many: dict) -> dict:
    """How the N-rank metadata differs from the 1-rank one."""
    exact, worst = True, 0.0
    for key, layer in one["layers"].items():
        for modality, entry in layer["stats"].items():
            other = many["layers"][key]["stats"][modality]
            exact &= entry["tokens"] == other["tokens"] and entry["count"] == other["count"]
            exact &= entry["max_abs"] == other["max_abs"]
            for name, values in entry.items():
                if isinstance(values, list):
                    for a, b in zip(values, other[name], strict=True):
                        if isinstance(a, float) and math.isfinite(a):
                            worst = max(worst, abs(a - b) / max(abs(a), abs(b), 1e-300))

    def untimed(meta: dict) -> dict:
        table = json.loads(json.dumps(meta.get("candidates", {})))
        for k in ("seconds", "greedy_seconds"):
            table.pop(k, None)
        for row in table.get("rows", []):
            row.get("search", {}).pop("seconds", None)
        return table

    return {
        "counts_tokens_max_exact": bool(exact),
        "worst_relative_sum_difference": worst,
        "same_plan": one["plan"] == many["plan"],
        "same_candidate_table": untimed(one) == untimed(many),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ranks", default="1,2", help="rank counts; the first is the baseline")
    parser.add_argument("--modes", default="full,router")
    parser.add_argument("--sets", default="mixed")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--text-samples", type=int, default=1024)
    parser.add_argument("--combined-samples", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--execution", default="memory", choices=("memory", "stream"))
    parser.add_argument("--eval-samples", type=int, default=0, help="REAP_EVAL_SAMPLES (candidate plans) of every run")
    parser.add_argument("--work", type=Path, default=Path("bench_distributed_work"))
    parser.add_argument("--small", action="store_true", help="tiny widths on the CPU (a smoke test)")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    ranks = [int(r) for r in args.ranks.split(",") if r]
    if args.small:
        args.layers, args.seq_len, args.batch_size = min(args.layers, 2), 64, 2
        args.text_samples, args.combined_samples = min(args.text_samples, 8), min(args.combined_samples, 8)
        args.eval_samples = min(args.eval_samples, 2)
    elif torch.cuda.device_count() < max(ranks):
        sys.exit(f"--ranks {args.ranks} needs {max(ranks)} GPUs, {torch.cuda.device_count()} visible")
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir = make_checkpoint(
        args.work / "model", SMALL if args.small else REAL, args.layers, torch.float32 if args.small else torch.bfloat16
    )
    text = str(text_jsonl(args.work / "text.jsonl", args.text_samples, args.seq_len))
    specs = {
        "text": (text, args.text_samples),
        "combined": ("combined", args.combined_samples),
        "mixed": (f"{text}:{args.text_samples},vision,tasks", 100_000),
    }
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.small else "cpu",
        "torch": torch.__version__,
        "layers": args.layers,
        "execution": args.execution,
        "weights_gib": weight_bytes(model_dir) / 2**30,
        "runs": [],
    }
    rows = []
    for label in [s for s in args.sets.split(",") if s]:
        spec, samples = specs[label]
        for mode in [m for m in args.modes.split(",") if m]:
            metas = {}
            for n in ranks:
                out = args.work / f"{label}-{mode}-{n}"
                wall = launch(n, argv_for(args, spec, samples, mode, args.eval_samples, out))
                metas[n] = json.loads((out / "reap_metadata.json").read_text())
                phases = metas[n]["scoring"]["phases"]
                run = {
                    "set": label,
                    "mode": mode,
                    "ranks": n,
                    "wall_s": round(wall, 1),
                    "tokens": metas[n]["calibration"]["tokens"],
                    "scoring": phases["scoring"],
                    "gpu_peak_gib_rank0": max((p.get("gpu_peak_gib", 0.0) for p in phases.values()), default=0.0),
                }
                base = metas[ranks[0]]["scoring"]["phases"]["scoring"]["tokens_per_s"]
                run["efficiency"] = phases["scoring"]["tokens_per_s"] / (n / ranks[0] * base)
                if n != ranks[0]:
                    run["equality"] = compare(metas[ranks[0]], metas[n])
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
                rows.append(run)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=1))
    print("\n| set | mode | ranks | scoring tokens/s | efficiency | GPU peak GiB (rank 0) | equal to 1 rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        eq = r.get("equality")
        same = (
            "-"
            if eq is None
            else (
                f"exact counts/max: {eq['counts_tokens_max_exact']}, sums {eq['worst_relative_sum_difference']:.1e}, "
                f"plan {eq['same_plan']}, table {eq['same_candidate_table']}"
            )
        )
        print(
            f"| {r['set']} | {r['mode']} | {r['ranks']} | {r['scoring']['tokens_per_s']:,.0f} | {r['efficiency']:.2f} "
            f"| {r['gpu_peak_gib_rank0']:.2f} | {same} |"
        )
    print(f"\ncommand: python {' '.join(sys.argv)}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
