"""Merging speed of one MoE layer: grouping + neuron alignment + averaging (reap_vlm.methods.merge).

Builds one layer with random weights at the given width (default: a Qwen3-VL-30B-A3B layer, 128 experts,
hidden 2048, moe_intermediate 768, bf16) and random merge statistics (mean gated outputs, router-logit
Gram matrix, S sampled activations), then times, on one device:
  group     REAM pseudo-pruning (distance matrix + grouping), 128 -> 96 with C = 16
  merge     PCA of the merged experts' neuron rows, one linear_sum_assignment per member, averaging
The target on an H200 is <= 30 s per real-width layer (grouping + alignment + averaging).

Usage: python bench/bench_merge.py [--experts 128 --hidden 2048 --inter 768 --target 96 --group-size 16]
                                   [--samples 128] [--device cuda|cpu] [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from reap_vlm.methods import merge


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experts", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=768)
    ap.add_argument("--target", type=int, default=96)
    ap.add_argument("--group-size", type=int, default=merge.REAM_GROUP_SIZE)
    ap.add_argument("--samples", type=int, default=128, help="sampled tokens of activations per expert")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    E, H, inter, device = args.experts, args.hidden, args.inter, torch.device(args.device)
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(torch.bfloat16).to(device)

    experts = merge.LayerExperts(rand(E, inter, H), rand(E, inter, H), rand(E, H, inter))
    mean_out = torch.randn(E, H, generator=gen, dtype=torch.float64)
    z = torch.randn(4096, E, generator=gen, dtype=torch.float64)
    gram = z.T @ z
    saliency = torch.rand(E, generator=gen, dtype=torch.float64).numpy()
    acts = rand(E, args.samples, inter)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    t0 = time.perf_counter()
    dist = merge.expert_distance(mean_out, gram)
    groups = merge.ream_groups(saliency, dist, args.target, args.group_size)
    t1 = time.perf_counter()
    merged = merge.merge_layer(experts, [g for g in groups if len(g) > 1], saliency, acts)
    sync()
    t2 = time.perf_counter()
    members = sum(len(g) - 1 for g in groups if len(g) > 1)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(),
        "experts": E,
        "hidden": H,
        "moe_intermediate": inter,
        "target": args.target,
        "group_size": args.group_size,
        "samples": args.samples,
        "groups": len(groups),
        "merged_groups": len(merged),
        "assignments": members,
        "group_s": round(t1 - t0, 3),
        "merge_s": round(t2 - t1, 3),
        "total_s": round(t2 - t0, 3),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)


if __name__ == "__main__":
    main()
