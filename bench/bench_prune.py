"""Pruning speed and memory on a generated multi-GB checkpoint, against `cp -r` of the same folder.

Generates a Qwen3-MoE-layout checkpoint (per-expert tensor names, bf16, several shards), then in one run:
  cp       wall time of `cp -r` of the checkpoint folder
  prune    wall time and peak RSS of prune (50 %) in a child process (reap_vlm.checkpoint)
Throughput is reported two ways: bytes of the source folder per second (what a user waits for), and
bytes actually moved (read + written) per second. Peak RSS is compared with the largest tensor + 1 GiB.

Usage: python bench/bench_prune.py [--gib 3] [--workdir DIR] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import json, sys, time
from reap_vlm.checkpoint import inspect_checkpoint, plan_prune, write_pruned
start = time.perf_counter()
layout = inspect_checkpoint(sys.argv[1])
keep = {k: list(range(0, n, 2)) for k, n in layout.counts().items()}
summary = write_pruned(plan_prune(layout, keep), sys.argv[2], hash_check_mb=0)
seconds = time.perf_counter() - start
# VmHWM: the peak RSS of this process image (ru_maxrss would carry the parent's peak across fork + exec)
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": seconds, "peak_rss": rss, "written": summary["bytes"]}))
"""


def generate(folder: Path, gib: float, hidden: int = 2048, inter: int = 768, experts: int = 64) -> dict:
    folder.mkdir(parents=True)
    per_layer = experts * 3 * hidden * inter * 2 + experts * hidden * 2 + 4 * hidden * hidden * 2
    layers = max(1, int(gib * 2**30 // per_layer))
    index, total, largest = {}, 0, 0
    gen = torch.Generator().manual_seed(0)
    shards = []
    for layer in range(layers):
        t = {}
        p = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            t[p + f"self_attn.{name}.weight"] = torch.randn(hidden, hidden, generator=gen).bfloat16()
        t[p + "mlp.gate.weight"] = torch.randn(experts, hidden, generator=gen).bfloat16()
        for j in range(experts):
            for proj, shape in (
                ("gate_proj", (inter, hidden)),
                ("up_proj", (inter, hidden)),
                ("down_proj", (hidden, inter)),
            ):
                t[p + f"mlp.experts.{j}.{proj}.weight"] = torch.empty(shape, dtype=torch.bfloat16).normal_(
                    generator=gen
                )
        shard = f"model-{layer + 1:05d}-of-{layers:05d}.safetensors"
        save_file(t, str(folder / shard), metadata={"format": "pt"})
        shards.append(shard)
        for name, v in t.items():
            index[name] = shard
            total += v.numel() * 2
            largest = max(largest, v.numel() * 2)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": index})
    )
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": experts,
        "num_experts_per_tok": 8,
        "hidden_size": hidden,
        "moe_intermediate_size": inter,
        "num_hidden_layers": layers,
    }
    (folder / "config.json").write_text(json.dumps(config))
    return {"bytes": total, "largest_tensor": largest, "layers": layers, "shards": len(shards)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=3.0)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(dir=args.workdir, prefix="bench_prune_"))
    try:
        src = work / "src"
        info = generate(src, args.gib)
        start = time.perf_counter()
        subprocess.run(["cp", "-r", str(src), str(work / "copy")], check=True)
        subprocess.run(["sync"], check=True)
        cp_seconds = time.perf_counter() - start
        shutil.rmtree(work / "copy")
        result = subprocess.run(
            [sys.executable, "-c", CHILD, str(src), str(work / "pruned")],
            check=True,
            capture_output=True,
            text=True,
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        )
        subprocess.run(["sync"], check=True)
        prune = json.loads(result.stdout.strip().splitlines()[-1])
        moved = prune["written"] * 2  # kept bytes read + written
        out = {
            "source_gib": info["bytes"] / 2**30,
            "shards": info["shards"],
            "largest_tensor_mib": info["largest_tensor"] / 2**20,
            "cp_seconds": cp_seconds,
            "prune_seconds": prune["seconds"],
            "cp_source_gib_per_s": info["bytes"] / 2**30 / cp_seconds,
            "prune_source_gib_per_s": info["bytes"] / 2**30 / prune["seconds"],
            "cp_moved_gib_per_s": 2 * info["bytes"] / 2**30 / cp_seconds,
            "prune_moved_gib_per_s": moved / 2**30 / prune["seconds"],
            "prune_peak_rss_mib": prune["peak_rss"] / 2**20,
            "rss_limit_mib": info["largest_tensor"] / 2**20 + 1024,
        }
        out["ratio_source_throughput"] = out["prune_source_gib_per_s"] / out["cp_source_gib_per_s"]
        out["ratio_moved_throughput"] = out["prune_moved_gib_per_s"] / out["cp_moved_gib_per_s"]
        print(json.dumps(out, indent=1))
        print("\n| measurement | value | target |\n|---|---|---|")
        print(f"| cp -r of {out['source_gib']:.2f} GiB ({info['shards']} shards) | {cp_seconds:.2f} s | |")
        print(f"| prune 50 % | {prune['seconds']:.2f} s | |")
        print(f"| throughput vs cp (source bytes / s) | {out['ratio_source_throughput']:.2f}x | >= 0.8x |")
        print(f"| throughput vs cp (bytes moved / s) | {out['ratio_moved_throughput']:.2f}x | |")
        print(f"| prune peak RSS | {out['prune_peak_rss_mib']:.0f} MiB | <= {out['rss_limit_mib']:.0f} MiB |")
        print(f"\ncommand: python {' '.join(sys.argv)}")
        if args.out:
            args.out.write_text(json.dumps(out, indent=1) + "\n")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
