"""One-pass FP8 block dequantization on CUDA (Triton): each e4m3 weight read once, its block's fp32 scale
applied in fp32, the product rounded once to the output dtype, written once (3 bytes of memory traffic per
bf16 weight). The same arithmetic as transformers' Fp8Dequantize (fp32(q) * s in fp32, then the cast), so the
same bits; `quantization.dequantize_fp8` checks that on each device before it uses this kernel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequantize_kernel(
    w_ptr,
    s_ptr,
    out_ptr,
    rows,
    N,
    K,
    SR,
    SC,
    BM: tl.constexpr,
    BN: tl.constexpr,
    TM: tl.constexpr,
    TK: tl.constexpr,
    BF16: tl.constexpr,
):
    r = tl.program_id(0) * TM + tl.arange(0, TM)  # flattened [E * N] rows
    c = tl.program_id(1) * TK + tl.arange(0, TK)
    rmask, cmask = r < rows, c < K
    e, n = r // N, r % N
    srow = (e * SR + n // BM) * SC  # the row of the row's block scales
    mask = rmask[:, None] & cmask[None, :]
    offs = r[:, None].to(tl.int64) * K + c[None, :]
    q = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + srow[:, None] + c[None, :] // BN, mask=mask, other=0.0)
    p = q * s
    if BF16:  # round to nearest even, in integers (as c10's float -> bfloat16), not left to the backend
        u = p.to(tl.uint32, bitcast=True)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        tl.store(out_ptr + offs, u.to(tl.uint16), mask=mask)
    else:
        tl.store(out_ptr + offs, p, mask=mask)


def dequantize_into(weight: torch.Tensor, scale_inv: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[...] = fp32(weight) * its block's scale, rounded to out's dtype (bf16 or fp32); weight [..., N, K]
    e4m3 contiguous, scale_inv [..., N/bm, K/bn] fp32, out contiguous of weight's shape."""
    N, K = weight.shape[-2:]
    SR, SC = scale_inv.shape[-2:]
    rows = weight.numel() // K
    TM, TK = 8, 512
    grid = (triton.cdiv(rows, TM), triton.cdiv(K, TK))
    bf16 = out.dtype == torch.bfloat16
    target = out.view(torch.uint16) if bf16 else out
    scales = scale_inv.contiguous()
    _dequantize_kernel[grid](weight, scales, target, rows, N, K, SR, SC, N // SR, K // SC, TM, TK, bf16)
    return out
