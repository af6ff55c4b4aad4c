"""Scoring cost at Qwen3-VL-30B-A3B widths (E=128, H=2048, I=768, top-8, bf16), one MoE layer.

Measures in one run, on one device:
  peak      a large bf16 matmul (the throughput reference of this GPU)
  full      the all-expert norms of full mode (reap_vlm.observe.kernel.all_expert_gram_norms) — TFLOP/s, % of
            peak; the direct computation (all_expert_norms) beside it, and how far the two differ
  dense     the naive baseline: a dense fp32 (E, T, H) activation tensor filled expert by expert, then norms
  routed    the block forward with the routed-mode observer vs the same forward without hooks
  router    the block forward with the router-mode observer vs without hooks
            (plain, routed and router timed in turn over several rounds, so that drift hits all alike)
  memory    peak GPU memory of full-mode scoring over many batches, minus the weights

Usage:  python bench/bench_scoring.py [--tokens 16384] [--batches 8] [--rounds 5] [--parts full,overhead,memory]
                                     [--out result.json]
        python bench/bench_scoring.py --small      # CPU smoke test (tiny sizes)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reap_vlm.moe import expert_weights, find_moe_blocks
from reap_vlm.observe import Observer
from reap_vlm.observe.kernel import all_expert_gram_norms, all_expert_norms
from reap_vlm.settings import ReapSettings


def timed(fn, device, repeat: int = 5, warmup: int = 2) -> float:
    """Median seconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


class Layer(torch.nn.Module):
    """A decoder-layer stand-in so that module paths look like a model's: layers.0.mlp.{gate,experts}."""

    def __init__(self, block, config):
        super().__init__()
        self.layers = torch.nn.ModuleList([torch.nn.Module()])
        self.layers[0].mlp = block
        self.config = config

    def forward(self, x):
        return self.layers[0].mlp(x)


def build(E, H, I, K, dtype, device):
    from transformers import Qwen3VLMoeTextConfig
    from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeTextSparseMoeBlock

    config = Qwen3VLMoeTextConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K)
    config._experts_implementation = "grouped_mm"
    block = Qwen3VLMoeTextSparseMoeBlock(config)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.02)
    block.experts.config = config
    return Layer(block, config).to(device=device, dtype=dtype).eval()


PARTS = ("full", "overhead", "memory")


def measure_full(result, args, model, x, device) -> None:
    """peak, full (with the budget sweep) and the dense baseline."""
    E, H, I, T = result["E"], result["H"], result["I"], result["tokens"]
    n = 512 if args.small else 8192  # a large square matmul in the same dtype
    square = [torch.randn(n, n, device=device, dtype=x.dtype) for _ in range(2)]
    result["peak_tflops"] = 2 * n**3 / timed(lambda: torch.mm(*square), device) / 1e12
    square.clear()

    weights = expert_weights(model.layers[0].mlp.experts)
    # full mode's all-pair work: gate+up GEMM, then h·G with each expert's [I, I] Gram matrix (+ G itself)
    flops = 4 * T * E * H * I + 2 * T * E * I * I + 2 * E * I * I * H
    with torch.inference_mode():
        seconds = timed(lambda: all_expert_gram_norms(weights, x, args.budget_mb), device, repeat=5)
        # the direct computation (f written, then its norm and max|f|): the path for experts without the
        # routed interface, and the reference for the Gram norms' precision
        direct_seconds = timed(lambda: all_expert_norms(weights, x, args.budget_mb), device, repeat=5)
        direct = all_expert_norms(weights, x, args.budget_mb)[0]
        gram = all_expert_gram_norms(weights, x, args.budget_mb)
        rel = ((gram - direct).abs() / direct.clamp_min(1e-30)).flatten()
    result["full_flops"] = flops
    result["full_seconds"] = seconds
    result["full_tflops"] = flops / seconds / 1e12
    result["full_pct_of_peak"] = 100 * result["full_tflops"] / result["peak_tflops"]
    result["direct_seconds"] = direct_seconds
    result["direct_tflops"] = 6 * T * E * H * I / direct_seconds / 1e12
    result["direct_pct_of_peak"] = 100 * result["direct_tflops"] / result["peak_tflops"]
    result["gram_vs_direct_rel_err"] = {
        "median": rel.median().item(),
        "p999": rel.kthvalue(max(1, int(0.999 * rel.numel()))).values.item(),
        "max": rel.max().item(),
    }
    result["budget_mb"] = args.budget_mb
    result["sweep_pct_of_peak"] = {}
    for budget in [int(b) for b in args.sweep.split(",") if b]:
        with torch.inference_mode():
            sec = timed(lambda b=budget: all_expert_gram_norms(weights, x, b), device, repeat=3)
        result["sweep_pct_of_peak"][budget] = round(100 * flops / sec / 1e12 / result["peak_tflops"], 1)

    def dense():
        acts = torch.empty((E, T, H), device=device, dtype=torch.float32)
        for j in range(E):
            h = torch.nn.functional.silu(x @ weights.gate[j].T) * (x @ weights.up[j].T)
            acts[j] = (h @ weights.down[j].T).float()
        return acts.norm(dim=-1)

    with torch.inference_mode():
        result["dense_seconds"] = timed(dense, device, repeat=3, warmup=1)
    result["full_speedup_vs_dense"] = result["dense_seconds"] / result["full_seconds"]


def measure_overhead(result, args, model, x, device) -> None:
    """The block forward without hooks, with the routed- and with the router-mode observer, in turn."""
    blocks = find_moe_blocks(model)
    modality = torch.zeros(x.shape[0], dtype=torch.long, device=device)
    xin = x.view(1, *x.shape)
    rounds = {"plain": [], "routed": [], "router": [], "full_forward": []}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for mode, times in rounds.items():
                if mode == "plain":
                    times.append(timed(lambda: model(xin), device, repeat=10))
                    continue
                with Observer(model, blocks, mode.removesuffix("_forward"), args.budget_mb) as obs:
                    obs.set_modality(modality)
                    times.append(timed(lambda: model(xin), device, repeat=10))
    median = {mode: sorted(times)[len(times) // 2] for mode, times in rounds.items()}
    result["plain_forward_seconds"] = median["plain"]
    for mode in ("routed", "router", "full_forward"):
        result[f"{mode}_seconds"] = median[mode]
        result[f"{mode}_over_plain"] = median[mode] / median["plain"]
    result["forward_seconds_per_round"] = rounds


def measure_memory(result, args, model, device) -> None:
    """Peak GPU memory of full-mode scoring over many batches, against plain forwards of the same batches."""
    blocks = find_moe_blocks(model)
    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    tm, H = args.memory_tokens, result["H"]
    batches = [torch.randn(1, tm, H, device=device, dtype=next(model.parameters()).dtype) for _ in range(args.batches)]
    mod = torch.zeros(tm, dtype=torch.long, device=device)
    peaks = {}
    for label in ("plain", "full"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()  # weights + the batches themselves
        with torch.inference_mode():
            if label == "plain":
                for b in batches:
                    model(b)
            else:
                with Observer(model, blocks, "full", args.budget_mb) as obs:
                    per_batch = []
                    for b in batches:
                        obs.set_modality(mod)
                        model(b)
                        per_batch.append(torch.cuda.max_memory_allocated() - base)
                    result["full_peak_extra_per_batch_gib"] = [round(v / 2**30, 3) for v in per_batch]
        peaks[label] = (torch.cuda.max_memory_allocated() - base) / 2**30
    result["weights_gib"] = weights_bytes / 2**30
    result["memory_tokens_per_batch"] = tm
    result["plain_forward_extra_gib"] = peaks["plain"]
    result["full_peak_extra_gib"] = peaks["full"]
    result["memory_batches"] = args.batches


def table(result) -> list[tuple[str, str, str]]:
    rows = []
    if "full_tflops" in result:
        rows += [
            ("bf16 matmul reference", f"{result['peak_tflops']:.0f} TFLOP/s", ""),
            (
                "full mode all-expert norms (Gram)",
                f"{result['full_tflops']:.0f} TFLOP/s ({result['full_seconds'] * 1e3:.1f} ms)",
                f"{result['full_pct_of_peak']:.1f} % of the reference (target >= 60 %)",
            ),
            (
                "direct all-expert norms + max|f|",
                f"{result['direct_tflops']:.0f} TFLOP/s ({result['direct_seconds'] * 1e3:.1f} ms)",
                f"{result['direct_pct_of_peak']:.1f} % of the reference",
            ),
            (
                "Gram vs direct norms, relative difference",
                "median {median:.1e}, 99.9 % {p999:.1e}, max {max:.1e}".format(**result["gram_vs_direct_rel_err"]),
                "",
            ),
            (
                "dense fp32 (E,T,H) baseline",
                f"{result['dense_seconds'] * 1e3:.1f} ms",
                f"full mode is {result['full_speedup_vs_dense']:.2f}x faster (target >= 2x)",
            ),
        ]
    for mode, target in (("routed", "1.3x"), ("router", "1.05x"), ("full_forward", "-")):
        if f"{mode}_seconds" in result:
            value = (
                f"{result[f'{mode}_over_plain']:.3f}x ({result[f'{mode}_seconds'] * 1e3:.2f} ms vs "
                f"{result['plain_forward_seconds'] * 1e3:.2f} ms)"
            )
            note = f"target <= {target}" if target != "-" else "every expert on every token, in the forward"
            rows.append((f"{mode.removesuffix('_forward')} mode / plain forward", value, note))
    if "full_peak_extra_gib" in result:
        value = (
            f"weights {result['weights_gib']:.2f} GiB + {result['full_peak_extra_gib']:.2f} GiB over "
            f"{result['memory_batches']} batches of {result['memory_tokens_per_batch']} tokens (plain forward: "
            f"+{result['plain_forward_extra_gib']:.2f} GiB)"
        )
        rows.append(("full mode peak memory", value, "target <= +1 GiB"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--batches", type=int, default=8, help="batches for the peak-memory measurement")
    parser.add_argument("--memory-tokens", type=int, default=4096, help="tokens per batch for the memory measurement")
    parser.add_argument(
        "--budget-mb",
        type=int,
        default=ReapSettings.chunk_memory_mb,
        help="full-mode chunk budget (default: REAP_CHUNK_MEMORY_MB's default)",
    )
    parser.add_argument("--sweep", default="512,1024,2048", help="other budgets whose full-mode speed is also timed")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of plain / routed / router forward timings")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what to measure, a subset of {','.join(PARTS)}")
    parser.add_argument("--small", action="store_true", help="tiny sizes for a CPU smoke test")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: unknown {sorted(parts - set(PARTS))}; choose from {','.join(PARTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() and not args.small else "cpu")
    E, H, I, K = (8, 64, 32, 2) if args.small else (128, 2048, 768, 8)
    T = 256 if args.small else args.tokens
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "E": E,
        "H": H,
        "I": I,
        "top_k": K,
        "tokens": T,
        "dtype": str(dtype),
    }
    model = build(E, H, I, K, dtype, device)
    x = torch.randn(T, H, device=device, dtype=dtype)
    if "full" in parts:
        measure_full(result, args, model, x, device)
    if "overhead" in parts:
        measure_overhead(result, args, model, x, device)
    del x
    if "memory" in parts and device.type == "cuda":
        measure_memory(result, args, model, device)

    print(json.dumps(result, indent=1))
    print("\n| measurement | value | note |\n|---|---|---|")
    for row in table(result):
        print("| " + " | ".join(row) + " |")
    print(f"\ncommand: python {' '.join(sys.argv)}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
