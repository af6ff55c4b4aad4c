"""The all-expert computation of full mode: ‖f_j(x)‖ and max|f_j(x)| for every expert j and token x.

Batched matmuls over the fused expert weights, chunked over tokens and experts so that the extra
memory stays under a budget: only [T, E] norms leave a chunk, never an (E, T, H) tensor for a
whole batch. Matmuls run in the weights' dtype (bf16 on GPU) with norms reduced in fp32."""

from __future__ import annotations

import torch

from ..moe.spec import ExpertWeights


def _chunk_sizes(
    num_tokens: int, num_experts: int, inter: int, hidden: int, itemsize: int, budget_bytes: int
) -> tuple[int, int]:
    """(tokens, experts) per chunk: the intermediate [e, t, 2I] and output [e, t, H] tensors fit the budget."""
    per_pair = (3 * inter + 2 * hidden) * itemsize + 8  # gate+up+act, output (+ fp32 square) per (token, expert)
    pairs = max(budget_bytes // per_pair, 1)
    experts = min(num_experts, max(pairs // max(num_tokens, 1), 1))
    tokens = min(num_tokens, max(pairs // experts, 1))
    return tokens, experts


def all_expert_norms(w: ExpertWeights, x: torch.Tensor, budget_mb: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """(norms [T, E] fp32, max_abs [T, E] fp32) of every expert's unweighted output on tokens x [T, H]."""
    T, H = x.shape
    E, inter = w.num_experts, w.up.shape[1]
    x = x.to(w.up.dtype)
    norms = torch.empty((T, E), dtype=torch.float32, device=x.device)
    peaks = torch.empty((T, E), dtype=torch.float32, device=x.device)
    t_step, e_step = _chunk_sizes(T, E, inter, H, x.element_size(), budget_mb << 20)
    for e0 in range(0, E, e_step):
        e1 = min(e0 + e_step, E)
        up_w, down_w = w.up[e0:e1], w.down[e0:e1]
        gate_w = None if w.gate is None else w.gate[e0:e1]
        for t0 in range(0, T, t_step):
            xt = x[t0 : t0 + t_step]  # [t, H]
            up = torch.matmul(xt, up_w.transpose(1, 2))  # [e, t, I]
            if w.up_bias is not None:
                up = up + w.up_bias[e0:e1, None, :]
            gate = None
            if gate_w is not None:
                gate = torch.matmul(xt, gate_w.transpose(1, 2))
                if w.gate_bias is not None:
                    gate = gate + w.gate_bias[e0:e1, None, :]
            out = torch.bmm(w.combine(gate, up), down_w.transpose(1, 2))  # [e, t, H]
            if w.down_bias is not None:
                out = out + w.down_bias[e0:e1, None, :]
            norms[t0 : t0 + t_step, e0:e1] = torch.linalg.vector_norm(out, dim=-1, dtype=torch.float32).T
            peaks[t0 : t0 + t_step, e0:e1] = out.abs().amax(dim=-1).float().T
    return norms, peaks
