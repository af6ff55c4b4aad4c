"""The description of one MoE block, and the canonical view of its expert weights.

Every family stores its experts differently (fused [E, 2I, H], transposed [E, H, 2I], interleaved
gate/up columns, biases). Scoring wants one shape: for expert j, gate/up weights [I, H] and down
[H, I] in nn.Linear convention, plus the activation that combines gate and up. `expert_weights`
returns that view (no copies) from the flags transformers' `@use_experts_implementation` decorator
sets on the experts module (`is_transposed`, `is_concatenated`, `has_gate`, `has_bias`).

Experts kept in FP8 (transformers' `FP8Experts`: e4m3 `gate_up_proj` / `down_proj` with a
`*_scale_inv` per block) have no dense weights to view: their `ExpertWeights` carries the FP8 tensors
(for their shapes) and a `dequantize(e0, e1)` that makes the dense weights of experts e0..e1 when they
are needed (reap_vlm.quantization.fp8_expert_weights). Readers go through `experts(e0, e1)`, which is a
view of the dense tensors, or such a chunk, so no reader dequantizes a whole layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MoEBlock:
    layer: int  # decoder layer index: the join key between memory and disk
    expert_set: str  # "experts"; ernie4_5_vl_moe: "text" / "vision"
    block: str  # module path of the MoE block
    router: str  # module path of the router module
    experts: str  # module path of the experts module
    num_experts: int
    top_k: int
    n_group: int = 1
    topk_group: int = 1
    score_fn: str = "softmax"  # how router logits become probabilities p(x): softmax or sigmoid
    router_weight: str = ""  # parameter path of the [rows, H] weight that makes the router logits
    router_rows: int = 0  # logit columns: num_experts, plus trailing non-prunable ones (zero experts, ...)
    # Llama 4: the experts get E pre-scaled copies of every token and no indices; the selection and its
    # weights are read from the router's output (scores [T, E], logits [T, E]) instead.
    indices_from_router: bool = False

    @property
    def key(self) -> str:
        return f"{self.layer}.{self.expert_set}"


@dataclass
class ExpertWeights:
    """Views of the expert tensors in nn.Linear convention, expert axis first."""

    gate: torch.Tensor | None  # [E, I, H] (None: no gate, e.g. nemotron_h)
    up: torch.Tensor  # [E, I, H]
    down: torch.Tensor  # [E, H, I]
    gate_bias: torch.Tensor | None  # [E, I]
    up_bias: torch.Tensor | None  # [E, I]
    down_bias: torch.Tensor | None  # [E, H]
    combine: Callable[[torch.Tensor | None, torch.Tensor], torch.Tensor]  # (gate_out, up_out) -> hidden
    gate_up: torch.Tensor | None = None  # [E, 2I, H] when gate rows [:I] and up rows [I:] are one tensor
    # quantized experts: (e0, e1) -> the dense ExpertWeights of experts e0..e1-1, dequantized on each call
    dequantize: Callable[[int, int], ExpertWeights] | None = None
    compute_dtype: torch.dtype | None = None  # quantized: the dtype `dequantize` returns
    chunk_bytes_per_expert: int = 0  # quantized: memory one expert takes while dequantized (temporaries too)

    @property
    def num_experts(self) -> int:
        return self.up.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the experts compute in (the dense weights', or the dequantized ones')."""
        return self.compute_dtype or self.up.dtype

    def experts(self, e0: int, e1: int) -> ExpertWeights:
        """Dense weights of experts e0..e1-1: views of the tensors, or (quantized) dequantized now."""
        if self.dequantize is not None:
            return self.dequantize(e0, e1)

        def cut(t):
            return None if t is None else t[e0:e1]

        return ExpertWeights(
            cut(self.gate),
            cut(self.up),
            cut(self.down),
            cut(self.gate_bias),
            cut(self.up_bias),
            cut(self.down_bias),
            self.combine,
            cut(self.gate_up),
        )


def _glu(act: Callable) -> Callable:
    def combine(gate, up):
        return act(gate) * up

    combine.act = act  # lets kernels recognise SiLU and fuse it
    return combine


def _gpt_oss_combine(alpha: float, limit: float) -> Callable:
    # gpt-oss clamps both halves and uses a sigmoid-weighted GLU with an offset on `up`.
    def combine(gate, up):
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))

    return combine


def _own_apply_gate(experts: torch.nn.Module) -> bool:
    """The class combines gate and up its own way, not with transformers' default act(gate) * up."""
    if not hasattr(experts, "_apply_gate"):
        return False
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:
        return not hasattr(experts, "act_fn")
    return type(experts)._apply_gate is not _default_apply_gate


def expert_weights(experts: torch.nn.Module) -> ExpertWeights:
    """Canonical views of a fused experts module's weights (see module docstring)."""
    from ..quantization import fp8_expert_weights, is_fp8_experts, is_quantized_experts, packed_expert_weights

    if is_fp8_experts(experts):
        return fp8_expert_weights(experts)
    if is_quantized_experts(experts):
        return packed_expert_weights(experts)
    transposed = bool(getattr(experts, "is_transposed", False))
    if not hasattr(experts, "is_transposed") and hasattr(experts, "gate_up_proj"):  # undecorated (Llama 4)
        hidden = getattr(experts, "hidden_size", None) or getattr(experts, "hidden_dim", None)
        transposed = experts.gate_up_proj.shape[1] == hidden != experts.gate_up_proj.shape[2]
    has_gate = bool(getattr(experts, "has_gate", True))
    interleaved = hasattr(experts, "alpha") and hasattr(experts, "limit")  # gpt-oss layout

    def oriented(t: torch.Tensor) -> torch.Tensor:
        return t.transpose(1, 2) if transposed else t

    down = oriented(experts.down_proj)
    gate_bias = up_bias = None
    down_bias = getattr(experts, "down_proj_bias", None)
    gate_up = None
    if has_gate:
        # [E, 2I, H]; LongCat also keeps its zero experts' rows here, after the E routed ones
        gate_up = oriented(experts.gate_up_proj)[: down.shape[0]]
        bias = getattr(experts, "gate_up_proj_bias", None)
        if interleaved:
            gate, up = gate_up[:, 0::2], gate_up[:, 1::2]
            if bias is not None:
                gate_bias, up_bias = bias[:, 0::2], bias[:, 1::2]
        else:
            half = gate_up.shape[1] // 2
            gate, up = gate_up[:, :half], gate_up[:, half:]
            if bias is not None:
                gate_bias, up_bias = bias[:, :half], bias[:, half:]
    else:
        gate, up = None, oriented(experts.up_proj)
        up_bias = getattr(experts, "up_proj_bias", None)

    if interleaved:
        combine = _gpt_oss_combine(float(experts.alpha), float(experts.limit))
    elif _own_apply_gate(experts):
        apply_gate = experts._apply_gate  # the family's own gate/up combination (clamped, soft-capped, ...)

        def combine(gate_out, up_out):
            return apply_gate(torch.cat([gate_out, up_out], dim=-1))
    elif gate is None:
        act = experts.act_fn

        def combine(_gate, up_out):
            return act(up_out)
    else:
        combine = _glu(experts.act_fn)
    fused = gate_up if has_gate and not interleaved and not transposed else None
    return ExpertWeights(gate, up, down, gate_bias, up_bias, down_bias, combine, fused)


def expert_output(w: ExpertWeights, j: int, x: torch.Tensor) -> torch.Tensor:
    """f_j(x) for tokens x [T, H]: the unweighted output of expert j (reference path, one expert)."""
    w, j = w.experts(j, j + 1), 0
    up = torch.nn.functional.linear(x, w.up[j], None if w.up_bias is None else w.up_bias[j])
    gate = None
    if w.gate is not None:
        gate = torch.nn.functional.linear(x, w.gate[j], None if w.gate_bias is None else w.gate_bias[j])
    h = w.combine(gate, up)
    return torch.nn.functional.linear(h, w.down[j], None if w.down_bias is None else w.down_bias[j])
