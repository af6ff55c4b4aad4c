"""The all-expert computation of full mode: ‖f_j(x)‖ and max|f_j(x)| for every expert j and token x.

Batched matmuls over the fused expert weights, chunked over tokens and experts so that the extra
memory stays under a budget: only [T, E] norms leave a chunk, never an (E, T, H) tensor for a
whole batch. Matmuls run in the weights' dtype (bf16 on GPU) with norms reduced in fp32.

The weights of each chunk of experts come from `ExpertWeights.experts(e0, e1)`: views of dense weights,
or, for experts kept quantized (FP8), that chunk dequantized now; its bytes (and the dequantization's
temporaries) count against the same budget, so a layer is never dequantized whole unless it fits."""

from __future__ import annotations

import torch

from ..moe.spec import ExpertWeights

_COMPILED: dict[str, object] = {}


def _row_stats_eager(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32), out.abs().amax(dim=-1).float()


def _swiglu_eager(proj: torch.Tensor, inter: int) -> torch.Tensor:
    return torch.nn.functional.silu(proj[..., :inter]) * proj[..., inter:]


def _fused(name: str, eager, device: torch.device):
    """On CUDA, a torch.compile'd version of an elementwise/reduction epilogue: one read of the expert
    outputs instead of one per statistic, and no fp32 copy. Eager elsewhere, or if compiling fails.

    Automatic dynamic shapes, not dynamic=True: the first shape compiles static, a later one makes only
    the dims that changed (tokens, experts per chunk) symbolic, so the hidden size stays a constant the
    kernel is tuned for. With every dim symbolic the same epilogues ran 1.5-2x slower on an H200 (row
    stats of [131072, 2048] bf16: 398 vs 265 us; SwiGLU of [3, 16384, 1536]: 151 vs 74 us)."""
    if device.type != "cuda":
        return eager
    if name not in _COMPILED:
        try:
            _COMPILED[name] = torch.compile(eager)
        except Exception:  # no compiler toolchain: the eager path gives the same numbers
            _COMPILED[name] = eager
    return _COMPILED[name]


def row_stats(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖row‖ fp32, max |row| fp32) over the last dim."""
    try:
        return _fused("row_stats", _row_stats_eager, out.device)(out)
    except Exception:
        _COMPILED["row_stats"] = _row_stats_eager
        return _row_stats_eager(out)


def _is_silu(combine) -> bool:
    act = getattr(combine, "act", None)
    return isinstance(act, torch.nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _chunk_sizes(num_tokens: int, num_experts: int, per_pair: int, per_expert: int, budget: int) -> tuple[int, int]:
    """(tokens, experts) per chunk: the per-(token, expert) intermediates and per-expert tensors fit the budget."""
    experts = min(num_experts, max(budget // max(num_tokens * per_pair + per_expert, 1), 1))
    tokens = min(num_tokens, max((budget - experts * per_expert) // (experts * per_pair), 1))
    return tokens, experts


def _rowdot_eager(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a.float() * b.float()).sum(dim=-1)


def _up_weight(w: ExpertWeights, e0: int, e1: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """[e*width, H] rows of the up (and gate) projections of experts e0..e1, expert-major, and their bias."""
    H = w.up.shape[2]
    if w.gate_up is not None and w.gate_bias is None and w.up_bias is None:
        return w.gate_up[e0:e1].reshape(-1, H), None  # [gate; up] per expert, no copy
    parts = [w.up[e0:e1]] if w.gate is None else [w.gate[e0:e1], w.up[e0:e1]]
    weight = torch.cat(parts, dim=1).reshape(-1, H)
    bias = None
    if w.up_bias is not None or w.gate_bias is not None:
        parts = [w.up_bias[e0:e1]] if w.gate is None else [w.gate_bias[e0:e1], w.up_bias[e0:e1]]
        bias = torch.cat(parts, dim=1).reshape(-1)
    return weight, bias


def _hidden(w: ExpertWeights, xt: torch.Tensor, up_weight, bias, e: int) -> torch.Tensor:
    """h = combine(gate, up) [e, t, I] of e experts on tokens xt: one GEMM for all of their up projections."""
    inter = w.up.shape[1]
    width = up_weight.shape[0] // e
    proj = torch.nn.functional.linear(xt, up_weight, bias).view(-1, e, width).transpose(0, 1)  # [e, t, w]
    if w.gate is None:
        return w.combine(None, proj)
    if _is_silu(w.combine):
        return _fused("swiglu", _swiglu_eager, proj.device)(proj, inter)
    return w.combine(proj[..., :inter], proj[..., inter:])


def all_expert_gram_norms(
    w: ExpertWeights, x: torch.Tensor, budget_mb: int = 768, gated=None, on_chunk=None
) -> torch.Tensor:
    """‖f_j(x)‖ [T, E] fp32 of every expert's unweighted output, without forming f_j(x) = W_j h + b_j:

        ‖f‖² = hᵀ (W_jᵀ W_j) h + 2 (W_jᵀ b_j)·h + ‖b_j‖²

    The [I, I] Gram matrix of each expert's down projection (computed once per call) replaces the
    [H, I] down projection: I/H of its work, and nothing of width H is ever written. In bf16 the Gram
    entries and h·G are rounded like the weights are: against the norms of the written outputs, a
    median relative difference of 1.2e-4 and a maximum of 1.4e-3 at Qwen3-VL-30B widths
    (docs/benchmarks.md); the routed pairs' norms come from the model's own kernel, not from here. In
    fp32 it equals the direct sum to rounding. max|f| needs f itself: `all_expert_norms` computes it.

    gated = (probs [T, E], acc [E, I]): also add Σ_x p_j(x) h_j(x) into acc (expert merging's
    statistics, observe.merge_stats), from the h this function computes anyway.

    on_chunk(e0, e1, chunk): called with the dense weights of each chunk of experts while they exist (full
    mode on FP8 experts computes the routed pairs' outputs from the same dequantized chunk)."""
    T = x.shape[0]
    E, inter = w.num_experts, w.up.shape[1]
    x = x.to(w.dtype)
    norms = torch.empty((T, E), dtype=torch.float32, device=x.device)
    per_pair = 5 * inter * x.element_size() + 8  # gate+up, h, h·G (+ slack for the epilogues)
    per_expert = inter * inter * x.element_size() + w.chunk_bytes_per_expert  # Gram (+ dequantized weights)
    t_step, e_step = _chunk_sizes(T, E, per_pair, per_expert, _budget(budget_mb))
    rowdot = _fused("rowdot", _rowdot_eager, x.device)
    for e0 in range(0, E, e_step):
        e1 = min(e0 + e_step, E)
        e = e1 - e0
        c = w.experts(e0, e1)
        if on_chunk is not None:
            on_chunk(e0, e1, c)
        up_weight, bias = _up_weight(c, 0, e)
        down = c.down  # [e, H, I]
        gram = torch.bmm(down.transpose(1, 2), down)  # [e, I, I]
        cross = sq_bias = None
        if c.down_bias is not None:
            b = c.down_bias.float()
            cross = torch.bmm(down.transpose(1, 2).float(), b[:, :, None])  # [e, I, 1]
            sq_bias = (b * b).sum(-1)[:, None]  # [e, 1]
        for t0 in range(0, T, t_step):
            h = _hidden(c, x[t0 : t0 + t_step], up_weight, bias, e)  # [e, t, I]
            _add_gated(gated, h, t0, e0, e1)
            sq = rowdot(torch.bmm(h, gram), h)  # [e, t]: hᵀGh, the products summed in fp32
            if cross is not None:
                sq = sq + 2 * torch.bmm(h.float(), cross).squeeze(-1) + sq_bias
            norms[t0 : t0 + t_step, e0:e1] = sq.clamp_min_(0).sqrt_().T
        del c, up_weight, bias, down  # a dequantized chunk is freed before the next one is made
    return norms


def _budget(budget_mb: float) -> int:
    return int(budget_mb * 2**20)


def _add_gated(gated, h: torch.Tensor, t0: int, e0: int, e1: int) -> None:
    """acc[e] += Σ_t p[t, e] h[e, t] for this chunk (gated = (probs [T, E], acc [E, I][, sample]) or None), and
    the sampled rows' h to the sample (merge_stats.Sample) where there is one."""
    if gated is None:
        return
    probs, acc, *sample = gated
    p = probs[t0 : t0 + h.shape[1], e0:e1].T.unsqueeze(1).to(h.dtype)  # [e, 1, t]
    acc[e0:e1] += torch.bmm(p, h).squeeze(1).to(acc.dtype)
    if sample:
        sample[0].take(h, t0, e0, e1)


def all_expert_norms(
    w: ExpertWeights, x: torch.Tensor, budget_mb: int = 768, gated=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms [T, E] fp32, max_abs [T, E] fp32) of every expert's unweighted output on tokens x [T, H];
    `gated` as in all_expert_gram_norms.

    Every expert sees the same tokens, so the up projection of a chunk of experts is one GEMM
    [t, H] x [H, e*2I]; the down projection is a batched GEMM over the experts."""
    T, H = x.shape
    E, inter = w.num_experts, w.up.shape[1]
    x = x.to(w.dtype)
    norms = torch.empty((T, E), dtype=torch.float32, device=x.device)
    peaks = torch.empty((T, E), dtype=torch.float32, device=x.device)
    per_pair = (3 * inter + 2 * H) * x.element_size() + 8  # gate+up+act, output (+ fp32 square)
    t_step, e_step = _chunk_sizes(T, E, per_pair, w.chunk_bytes_per_expert, _budget(budget_mb))
    for e0 in range(0, E, e_step):
        e1 = min(e0 + e_step, E)
        c = w.experts(e0, e1)
        up_weight, bias = _up_weight(c, 0, e1 - e0)
        down_t = c.down.transpose(1, 2)  # [e, I, H]
        for t0 in range(0, T, t_step):
            h = _hidden(c, x[t0 : t0 + t_step], up_weight, bias, e1 - e0)
            _add_gated(gated, h, t0, e0, e1)
            out = torch.bmm(h, down_t)  # [e, t, H]
            if c.down_bias is not None:
                out = out + c.down_bias[:, None, :]
            n, p = row_stats(out)
            norms[t0 : t0 + t_step, e0:e1] = n.T
            peaks[t0 : t0 + t_step, e0:e1] = p.T
        del c, up_weight, bias, down_t  # a dequantized chunk is freed before the next one is made
    return norms, peaks
