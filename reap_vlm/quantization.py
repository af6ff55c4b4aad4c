"""Quantized checkpoints: which format a checkpoint is in, and its weights dequantized as they are read.

Formats, detected from config.json's `quantization_config`, or, for an export that carries none, from the
tensor names and dtypes of the safetensors headers:

  fp8                 block-wise e4m3 `weight` + fp32 `weight_scale_inv` per [bm, bn] block (Qwen's and
                      DeepSeek's FP8 releases, `weight_block_size` [128, 128]). Dequantized by transformers'
                      own `Fp8Dequantize`, the op its fine-grained FP8 loader runs on a CPU.
  compressed-tensors  llm-compressor's exports: `weight_packed` / `weight_scale` / `weight_shape`
                      (+ `weight_zero_point`, `weight_g_idx`) for pack-quantized int4/int8, fp8 `weight` +
                      `weight_scale` for float-quantized. Decompressed by the compressed-tensors package's
                      own `CompressedTensorsDequantizer` (its decompressors, per module).
  awq                 AutoAWQ GEMM: `qweight` int32 [in, out*bits/32], `qzeros` int32 [in/g, out*bits/32],
                      `scales` fp16 [in/g, out]. compressed-tensors' `AutoAWQConverter` turns each module into
                      its pack-quantized form, whose decompressor gives the weight.
  gptq                AutoGPTQ / GPTQModel `gptq` format: `qweight` int32 [in*bits/32, out] (input rows packed
                      along dim 0, value k of a word in bits [k*bits, (k+1)*bits)), `qzeros` int32
                      [groups, out*bits/32] storing zero-1 (`checkpoint_format` gptq; gptq_v2 stores the
                      zero itself), `scales` fp16 [groups, out], `g_idx` int32 [in] the group of every input
                      row (act-order: not i // group_size). No maintained library unpacks it without a GPU,
                      so `_gptq_weight` does, as W[o, i] = scales[g_idx[i], o] * (q[i, o] - z[g_idx[i], o])
                      in the scales' dtype, the arithmetic of the reference packers' torch kernels.

The result of every format is the module's `weight` in the scales' precision (bf16/fp16/fp32), then cast to
the compute dtype: the statistics are computed from exactly the dequantized weights the quantized model
multiplies by. `Dequantizer.plan` maps each logical weight to the on-disk tensors it is made of, so the
layer reader (execution.weights) reads those, calls `Dequantizer.weight`, and hands transformers' loading
conversions plain weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import UnsupportedModelError

FORMATS = ("fp8", "compressed-tensors", "awq", "gptq")
# (marker suffix, companion suffixes) per format: a module is quantized when its marker tensor is present
_PARTS = {
    "fp8": ("weight_scale_inv", ("weight", "weight_scale_inv")),
    "compressed-tensors": (
        None,  # the marker depends on the scheme: weight_packed, or weight + weight_scale
        ("weight_packed", "weight", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"),
    ),
    "awq": ("qweight", ("qweight", "qzeros", "scales")),
    "gptq": ("qweight", ("qweight", "qzeros", "scales", "g_idx")),
}
# activation / KV-cache scales of static schemes: no weight is made from them, the reader skips them
_ACTIVATION = ("input_scale", "activation_scale", "output_scale", "k_scale", "v_scale", "input_global_scale")
_PER_EXPERT_SWAPPED = re.compile(r"^(?P<head>.+\.experts)\.(?P<proj>[A-Za-z_]\w*)\.(?P<j>\d+)\.(?P<rest>.+)$")


@dataclass(frozen=True)
class Quantization:
    """What `verify` reports and the metadata records about a quantized checkpoint."""

    format: str  # one of FORMATS
    bits: int
    scheme: str = ""  # "block", "pack-quantized", "float-quantized", "gemm", "act-order", ...
    group_size: int | None = None  # int formats: weights per scale (None: per channel)
    block_size: tuple[int, int] | None = None  # fp8: [rows, cols] per scale
    source: str = "config.json"  # or "tensor names"
    modules: dict[str, int] = field(default_factory=dict)  # kind -> quantized weights of that kind

    def summary(self) -> dict:
        out = {"format": self.format, "bits": self.bits, "scheme": self.scheme, "source": self.source}
        if self.group_size is not None:
            out["group_size"] = self.group_size
        if self.block_size is not None:
            out["block_size"] = list(self.block_size)
        out["quantized"] = dict(sorted(self.modules.items()))
        out["quantized_kinds"] = "experts only" if set(self.modules) == {"experts"} else ", ".join(sorted(self.modules))
        return out


def _kind(name: str, role_kind: str) -> str:
    if role_kind in ("expert", "fused"):
        return "experts"
    if role_kind in ("router", "buffer"):
        return "router"
    if "shared_expert" in name:
        return "shared experts"
    if "visual." in name or "vision" in name:
        return "vision"
    if "attn." in name or "attention." in name:
        return "attention"
    return "other"


def _modules_from_names(names: Iterable[str], dtypes: dict[str, str]) -> tuple[str | None, dict[str, set[str]]]:
    """(format guessed from the names, {module prefix: its quantization suffixes})."""
    modules: dict[str, set[str]] = {}
    for name in names:
        prefix, _, leaf = name.rpartition(".")
        modules.setdefault(prefix, set()).add(leaf)
    quantized = {}
    guess = None
    for prefix, leaves in modules.items():
        if "qweight" in leaves:
            guess = guess or ("gptq" if "g_idx" in leaves else "awq")
        elif "weight_packed" in leaves or ("weight" in leaves and "weight_scale" in leaves):
            guess = guess or "compressed-tensors"
        elif "weight_scale_inv" in leaves:
            guess = guess or "fp8"
        else:
            continue
        quantized[prefix] = leaves
    # AWQ and GPTQ without g_idx share names; their qweight shapes differ (AWQ packs the output dim)
    return guess, quantized


def _config_of(config: dict) -> dict:
    text = config.get("text_config") or {}
    return config.get("quantization_config") or text.get("quantization_config") or {}


def detect(config: dict, layout=None) -> Quantization | None:
    """The checkpoint's quantization, or None for plain weights. `layout`: checkpoint.layout.Layout (the
    tensor names, dtypes and roles); without it only config.json is read."""
    qc = _config_of(config)
    method = str(qc.get("quant_method") or "")
    names = list(layout.tensors) if layout is not None else []
    dtypes = {n: t.dtype for n, t in layout.tensors.items()} if layout is not None else {}
    guess, modules = _modules_from_names(names, dtypes)
    if not method and guess is None:
        return None
    fmt = {"fp8": "fp8", "compressed-tensors": "compressed-tensors", "awq": "awq", "gptq": "gptq"}.get(method)
    if method and fmt is None:
        raise UnsupportedModelError(
            f"{method}-quantized checkpoints are not supported",
            "scoring reads fp8 (block-wise), compressed-tensors, AWQ (GEMM) and GPTQ exports",
            "Score the unquantized checkpoint, or a supported export of it",
        )
    fmt = fmt or guess
    kinds: dict[str, int] = {}
    if layout is not None:
        for prefix, leaves in modules.items():
            marker = next(f"{prefix}.{leaf}" for leaf in sorted(leaves))
            role = layout.roles.get(marker)
            kind = _kind(prefix, role.kind if role is not None else "copy")
            kinds[kind] = kinds.get(kind, 0) + 1
    source = "config.json" if method else "tensor names"
    if fmt == "fp8":
        block = qc.get("weight_block_size")
        if block is None and layout is not None and modules:
            prefix = next(iter(modules))
            w, s = layout.tensors[f"{prefix}.weight"].shape, layout.tensors[f"{prefix}.weight_scale_inv"].shape
            block = [-(-w[-2] // s[-2]), -(-w[-1] // s[-1])] if len(s) >= 2 else None
        scheme = "block" if block else "tensor"
        return Quantization("fp8", 8, scheme, None, tuple(block) if block else None, source, kinds)
    if fmt == "compressed-tensors":
        groups = list((qc.get("config_groups") or {}).values())
        weights = (groups[0].get("weights") or {}) if groups else {}
        scheme = str(qc.get("format") or (groups[0].get("format") if groups else "") or "")
        if not scheme and modules:
            scheme = "pack-quantized" if any("weight_packed" in v for v in modules.values()) else "float-quantized"
        return Quantization(
            "compressed-tensors",
            int(weights.get("num_bits") or (4 if scheme == "pack-quantized" else 8)),
            scheme,
            weights.get("group_size"),
            tuple(weights["block_structure"]) if weights.get("block_structure") else None,
            source,
            kinds,
        )
    bits = int(qc.get("bits") or qc.get("w_bit") or 4)
    group = qc.get("group_size", qc.get("q_group_size"))
    if fmt == "awq":
        version = str(qc.get("version") or "gemm").lower()
        return Quantization("awq", bits, version, group, None, source, kinds)
    act_order = bool(qc.get("desc_act"))
    return Quantization("gptq", bits, "act-order" if act_order else "in-order", group, None, source, kinds)


def canonical(name: str) -> str:
    """Per-expert names in the order transformers' conversions expect: `experts.gate_proj.3.weight` (the
    ModelOpt order some AWQ exports use) -> `experts.3.gate_proj.weight`."""
    m = _PER_EXPERT_SWAPPED.match(name)
    return f"{m['head']}.{m['j']}.{m['proj']}.{m['rest']}" if m else name


class Dequantizer:
    """Turns a quantized checkpoint's tensors into plain weights, module by module."""

    def __init__(self, model_dir: Path, config: dict, quant: Quantization):
        self.quant, self.config = quant, config
        self.qc = _config_of(config)
        self._ct = None
        if quant.format == "compressed-tensors":
            from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

            # dtype=None: the decompressor's own result dtype (the scales'); the reader casts afterwards
            self._ct = CompressedTensorsDequantizer(str(model_dir), dtype=torch.float32)
        if quant.format == "awq":
            if quant.scheme != "gemm":
                raise UnsupportedModelError(
                    f"AWQ version {quant.scheme!r} is not supported",
                    "scoring unpacks AutoAWQ GEMM exports",
                    "Use a GEMM export of the model",
                )
            from compressed_tensors.entrypoints.convert.converters.autoawq import AutoAWQConverter

            self._awq = AutoAWQConverter.from_autoawq_config({**self.qc, "modules_to_not_convert": []})

    def plan(self, names: Iterable[str]) -> tuple[dict[str, tuple[str, ...]], list[str]]:
        """({logical name: on-disk tensors it is made of}, on-disk tensors no weight is made of). Plain
        tensors map to themselves; a quantized module's parts map to `<module>.weight`."""
        names = list(names)
        _, modules = _modules_from_names(names, {})
        if self.quant.format == "fp8":
            modules = {p: v for p, v in modules.items() if "weight_scale_inv" in v}
        parts_of = set(_PARTS[self.quant.format][1])
        plan: dict[str, tuple[str, ...]] = {}
        skipped: list[str] = []
        taken: set[str] = set()
        for prefix, leaves in modules.items():
            parts = tuple(f"{prefix}.{leaf}" for leaf in sorted(leaves & parts_of))
            plan[f"{prefix}.weight"] = parts
            taken.update(parts)
        for name in names:
            if name in taken:
                continue
            if name.rpartition(".")[2] in _ACTIVATION:
                skipped.append(name)
                continue
            plan[name] = (name,)
        return plan, skipped

    def weight(self, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """A quantized module's weight [out, in] from its on-disk parts (`tensors`, by on-disk name, the
        parts that `plan` named)."""
        prefix = next(iter(tensors)).rpartition(".")[0]
        logical = f"{prefix}.weight"
        fmt = self.quant.format
        if fmt == "fp8":
            return _fp8_weight(tensors[f"{prefix}.weight"], tensors[f"{prefix}.weight_scale_inv"])
        if fmt == "compressed-tensors":
            out = self._ct.process(dict(tensors))
            return out[logical]
        if fmt == "awq":
            return _awq_weight(self._awq, prefix, tensors)
        return _gptq_weight(
            tensors[f"{prefix}.qweight"],
            tensors[f"{prefix}.qzeros"],
            tensors[f"{prefix}.scales"],
            tensors[f"{prefix}.g_idx"] if f"{prefix}.g_idx" in tensors else None,
            self.quant.bits,
            self.quant.group_size,
            v2=str(self.qc.get("checkpoint_format", "gptq")) == "gptq_v2",
        )


def _fp8_weight(weight: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    """transformers' Fp8Dequantize of one (weight, weight_scale_inv) pair, in fp32 (the op keeps the
    destination parameter's dtype when it knows it; the reader casts afterwards)."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    return Fp8Dequantize(None)._dequantize_one(weight, scale_inv, output_dtype=torch.float32)


def _awq_weight(converter, prefix: str, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    from compressed_tensors.compressors import BaseCompressor

    converted = converter.process(dict(tensors))
    scheme = converter._build_quant_config().config_groups["config_group_0"]
    compressor = BaseCompressor.get_value_from_registry(scheme.format)
    local = {k[len(prefix) + 1 :]: v for k, v in converted.items() if k.startswith(prefix + ".")}
    return compressor.decompress(local, scheme)["weight"]


def _gptq_weight(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    group_size: int | None,
    v2: bool = False,
) -> torch.Tensor:
    """[out, in] weight of a GPTQ module (format in the module docstring)."""
    if bits not in (2, 4, 8):
        raise UnsupportedModelError(
            f"GPTQ with {bits} bits is not supported", "scoring unpacks 2-, 4- and 8-bit GPTQ", "Use a 4-bit export"
        )
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    q = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & mask  # [in/pw, pw, out]
    q = q.reshape(-1, qweight.shape[1])  # [in, out]
    z = (qzeros.unsqueeze(2) >> shifts.view(1, 1, -1)) & mask  # [groups, out/pw, pw]
    z = z.reshape(qzeros.shape[0], -1)  # [groups, out]
    if not v2:
        z = z + 1
    rows = q.shape[0]
    if g_idx is None:
        size = rows if group_size in (None, -1) else group_size
        g_idx = torch.arange(rows, device=q.device) // size
    g = g_idx.long()
    weight = scales[g] * (q - z[g]).to(scales.dtype)  # [in, out], in the scales' dtype
    return weight.T.contiguous()


def dequantized_bytes(layout, quant: Quantization, itemsize: int = 2) -> int:
    """Bytes of the checkpoint's tensors once its quantized weights are dequantized to a compute dtype of
    `itemsize` bytes: what the model holds in memory (verify's scoring-memory estimate, REAP_EXECUTION=auto)."""
    _, modules = _modules_from_names(layout.tensors, {})
    total = sum(t.nbytes for t in layout.tensors.values())
    for prefix, leaves in modules.items():
        parts = [f"{prefix}.{leaf}" for leaf in leaves if leaf in _PARTS[quant.format][1] or leaf in _ACTIVATION]
        total -= sum(layout.tensors[p].nbytes for p in parts if p in layout.tensors)
        main = next((f"{prefix}.{leaf}" for leaf in ("qweight", "weight_packed") if leaf in leaves), f"{prefix}.weight")
        elements = 1
        for d in layout.tensors[main].shape:
            elements *= d
        if main.endswith(("qweight", "weight_packed")):
            elements = elements * 32 // quant.bits
        total += elements * itemsize
    return total


# ---- FP8 experts kept in memory ---------------------------------------------------------------------------
# On a GPU an FP8 checkpoint's routed experts stay e4m3 in memory, in transformers' own `FP8Experts` modules
# (gate_up_proj [E, 2I, H] and down_proj [E, H, I] in e4m3, `*_scale_inv` per [bm, bn] block): routed and
# router modes run transformers' FP8 expert kernels when they load (its `finegrained-fp8` kernel), and
# otherwise `dequantized_experts_forward`; everything that needs dense expert weights (full mode's
# all-expert norms, the merge statistics) dequantizes them a chunk of experts at a time (`dequantize_fp8`:
# transformers' `Fp8Dequantize`, the op its loader dequantizes with, bit for bit, computed in place), so the
# numbers equal the dequantized model's.

FP8_DEQUANTIZED_IMPL = "reap_fp8_dequantized"  # the experts implementation without transformers' FP8 kernels
PACKED_DEQUANTIZED_IMPL = "reap_dequantized"  # PackedExperts' experts implementation
DEQUANTIZED_IMPLS = (FP8_DEQUANTIZED_IMPL, PACKED_DEQUANTIZED_IMPL)
DEFAULT_CHUNK_BYTES = 768 << 20  # REAP_CHUNK_MEMORY_MB's default, for forwards outside an Observer
_FP8_CLASS: list = []


class DequantizedLedger:
    """Instrumentation: bytes of dequantized expert weights alive at once (`peak`), and chunks made."""

    def __init__(self) -> None:
        import threading

        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        self.live = self.peak = self.chunks = self.largest = 0

    def track(self, *tensors: torch.Tensor) -> None:
        import weakref

        for t in tensors:
            n = t.numel() * t.element_size()
            with self._lock:
                self.live += n
                self.peak = max(self.peak, self.live)
            weakref.finalize(t, self._free, n)
        with self._lock:
            self.chunks += 1
            self.largest = max(self.largest, sum(t.numel() * t.element_size() for t in tensors))

    def _free(self, n: int) -> None:
        with self._lock:
            self.live -= n


DEQUANTIZED = DequantizedLedger()


def is_fp8_experts(module: torch.nn.Module) -> bool:
    down = getattr(module, "down_proj", None)
    fp8 = isinstance(down, torch.Tensor) and down.dtype == torch.float8_e4m3fn
    return fp8 and hasattr(module, "down_proj_scale_inv")


def is_quantized_experts(module: torch.nn.Module) -> bool:
    """Experts kept quantized in memory: transformers' FP8Experts (FP8) or PackedExperts (the other formats)."""
    return is_fp8_experts(module) or isinstance(module, PackedExperts)


# output dtypes that hold every e4m3 value exactly (so casting the weight first loses nothing)
_FP8_EXACT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def dequantize_fp8(
    weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None = None
) -> torch.Tensor:
    """transformers' Fp8Dequantize of e4m3 weights [..., N, K] with their block scales, in `dtype`, bit for bit,
    written into `out` (a contiguous tensor of the weight's shape in `dtype`) when given.

    Fp8Dequantize computes fp32(q) * s in fp32 and casts the product: four passes over the weights, with an
    fp32 copy and an fp32 product alive (19 bytes of traffic per weight). On CUDA (bf16 or fp32 out, where
    `_triton_exact` checked it) one Triton pass does the same arithmetic (reap_vlm.fp8_triton: 3 bytes per
    bf16 weight). Elsewhere the e4m3 weights are cast into the output first (exact: bf16, fp16 and fp32 hold
    every e4m3 value), then multiplied in place by the fp32 scales: the product of mixed dtypes is formed
    in fp32 (the promoted dtype) and rounded once to `dtype`, as in the reference, in two passes and
    without temporaries. Other dtypes, or scales that are not one per block of a 2-d grid, take
    transformers' op itself."""
    if not _fp8_in_place(weight, scale_inv, dtype):
        from transformers.integrations.finegrained_fp8 import Fp8Dequantize

        result = Fp8Dequantize(None)._dequantize_one(weight, scale_inv, output_dtype=dtype)
        if out is None:
            return result
        return out.copy_(result)
    if out is None:
        out = torch.empty(weight.shape, dtype=dtype, device=weight.device)
    if _triton_exact(weight, scale_inv, dtype):
        from .fp8_triton import dequantize_into

        return dequantize_into(weight, scale_inv, out)
    out.copy_(weight)
    (rows, cols), (sr, sc) = weight.shape[-2:], scale_inv.shape[-2:]
    bm, bn = rows // sr, cols // sc
    out.view(-1, sr, bm, sc, bn).mul_(scale_inv.reshape(-1, sr, 1, sc, 1))
    return out


def _fp8_in_place(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether dequantize_fp8 makes these weights without transformers' op (in place, or the one-pass kernel):
    e4m3 contiguous weights [..., N, K], fp32 scales one per block of a 2-d grid, an output dtype that holds
    every e4m3 value. Otherwise Fp8Dequantize's fp32 copy and product are alive while the weights are made."""
    if scale_inv.dim() < 2:
        return False
    (rows, cols), (sr, sc) = weight.shape[-2:], scale_inv.shape[-2:]
    return (
        weight.dtype == torch.float8_e4m3fn
        and dtype in _FP8_EXACT_DTYPES
        and scale_inv.dtype == torch.float32
        and scale_inv.shape[:-2] == weight.shape[:-2]
        and rows % sr == 0
        and cols % sc == 0
        and weight.is_contiguous()
    )


_TRITON_EXACT: dict = {}  # (device, dtype) -> whether the one-pass kernel gave Fp8Dequantize's bits there


def _triton_exact(weight: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether dequantize_fp8 takes the one-pass Triton kernel (reap_vlm.fp8_triton) for this device and dtype:
    CUDA, bf16 or fp32 output, and on first use the kernel's result on the first matrix equal bit for bit to
    transformers' Fp8Dequantize (else, or if Triton fails, the two-pass torch path, for the process). On the
    H200 the two passes took 5.4 ms per Qwen3-VL-30B-A3B layer: the in-place product of mixed dtypes runs
    torch's dynamically casting kernel (docs/benchmarks.md)."""
    if weight.device.type != "cuda" or dtype not in (torch.bfloat16, torch.float32):
        return False
    key = (weight.device, dtype)
    if key not in _TRITON_EXACT:
        try:
            from transformers.integrations.finegrained_fp8 import Fp8Dequantize

            from .fp8_triton import dequantize_into

            w = weight.reshape(-1, *weight.shape[-2:])[:1]
            s = scale_inv.reshape(-1, *scale_inv.shape[-2:])[:1]
            got = dequantize_into(w, s, torch.empty(w.shape, dtype=dtype, device=w.device))
            ref = Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=dtype)
            _TRITON_EXACT[key] = bool(torch.equal(got.view(torch.uint8), ref.view(torch.uint8)))
        except Exception:  # no Triton, no compiler for this GPU
            _TRITON_EXACT[key] = False
    return _TRITON_EXACT[key]


def fp8_expert_weights(experts: torch.nn.Module):
    """moe.spec.ExpertWeights of an FP8Experts module: the e4m3 tensors (their shapes), and `dequantize(e0, e1)`
    that makes the dense weights of experts e0..e1 in the module's compute dtype."""
    from .moe.spec import ExpertWeights, _glu

    dtype = getattr(experts, "_reap_compute_dtype", torch.bfloat16)
    gate_up, down = experts.gate_up_proj, experts.down_proj
    inter = gate_up.shape[1] // 2
    if any(getattr(experts, a, None) is not None for a in ("gate_softcap", "swiglu_alpha", "limit")):
        apply_gate = experts._apply_gate

        def combine(gate_out, up_out):
            return apply_gate(torch.cat([gate_out, up_out], dim=-1))
    else:
        combine = _glu(experts.act_fn)

    def dense(e0: int, e1: int) -> ExpertWeights:
        gu = dequantize_fp8(gate_up[e0:e1], experts.gate_up_proj_scale_inv[e0:e1], dtype)
        dn = dequantize_fp8(down[e0:e1], experts.down_proj_scale_inv[e0:e1], dtype)
        DEQUANTIZED.track(gu, dn)
        return ExpertWeights(gu[:, :inter], gu[:, inter:], dn, None, None, None, combine, gu)

    elements = gate_up[0].numel() + down[0].numel()
    # the dense weights (dequantize_fp8 writes them in place); transformers' op, where it is used instead,
    # also holds an fp32 copy and product while they are made
    per_expert = elements * torch.empty((), dtype=dtype).element_size()
    in_place = all(
        _fp8_in_place(w[:1], getattr(experts, f"{n}_scale_inv")[:1], dtype)
        for n, w in (("gate_up_proj", gate_up), ("down_proj", down))
    )
    if not in_place:
        per_expert += elements * 8
    return ExpertWeights(
        gate_up[:, :inter], gate_up[:, inter:], down, None, None, None, combine, gate_up, dense, dtype, per_expert
    )


def experts_per_chunk(w, budget_bytes: int) -> int:
    """Experts whose dequantized weights fit `budget_bytes` (at least one)."""
    return max(1, min(w.num_experts, budget_bytes // max(w.chunk_bytes_per_expert, 1)))


class SortedPairs:
    """The selected (token, expert) pairs of a batch sorted by expert, as transformers' grouped_mm forward
    sorts them, and their unweighted expert outputs, filled a chunk of experts at a time (`run`)."""

    def __init__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, w):
        self.T, self.K = top_k_index.shape
        E = w.num_experts
        expert_ids, self.perm = torch.sort(top_k_index.reshape(-1))
        self.hidden_g = hidden_states[self.perm // self.K]
        counts = torch.bincount(expert_ids.clamp(0, E), minlength=E + 1)[:E]  # ids >= E (EP sentinels) left out
        ends = torch.cumsum(counts, dim=0)
        self.ends_device = ends.to(torch.int32)  # the chunks' group offsets, made without a host copy
        self.ends = ends.tolist()  # the one host wait of the batch: the rows of each chunk of experts
        shape = (self.hidden_g.shape[0], hidden_states.shape[-1])
        self.out = torch.zeros(shape, dtype=w.dtype, device=self.perm.device)

    def run(self, experts: torch.nn.Module, e0: int, e1: int, chunk) -> None:
        """The outputs of the pairs of experts e0..e1-1 from their dense weights `chunk` (ExpertWeights)."""
        from transformers.integrations.moe import _grouped_linear

        lo, hi = self.ends[e0 - 1] if e0 else 0, self.ends[e1 - 1]
        if lo == hi:
            return
        offsets = self.ends_device[e0:e1] - lo  # (torch.tensor(list) would wait for the GPU each chunk)
        proj = experts._apply_gate(_grouped_linear(self.hidden_g[lo:hi], chunk.gate_up, offsets))
        self.out[lo:hi] = _grouped_linear(proj, chunk.down, offsets)

    def unsort(self, t: torch.Tensor) -> torch.Tensor:
        """Rows in the sorted order -> [T, K, ...] in the batch's order."""
        inv_perm = torch.empty_like(self.perm)
        inv_perm[self.perm] = torch.arange(self.perm.size(0), device=self.perm.device)
        return t[inv_perm].view(self.T, self.K, *t.shape[1:])


def dequantized_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """transformers' grouped_mm experts forward on experts kept quantized in memory (FP8Experts whose FP8
    kernels do not load: a CPU, or a GPU without the `kernels` package or its hub download; PackedExperts):
    the tokens sorted by expert as there, and each chunk of experts (within the module's `_reap_chunk_bytes`)
    dequantized (`ExpertWeights.experts`) and multiplied with transformers' `_grouped_linear`. The same
    numbers as the dequantized model's grouped_mm forward."""
    w = fp8_expert_weights(self) if is_fp8_experts(self) else packed_expert_weights(self)
    pairs = SortedPairs(hidden_states, top_k_index, w)
    step = experts_per_chunk(w, getattr(self, "_reap_chunk_bytes", DEFAULT_CHUNK_BYTES))
    for e0 in range(0, w.num_experts, step):
        e1 = min(e0 + step, w.num_experts)
        if (pairs.ends[e0 - 1] if e0 else 0) == pairs.ends[e1 - 1]:
            continue  # no token chose these experts: nothing to dequantize
        chunk = w.experts(e0, e1)
        pairs.run(self, e0, e1, chunk)
        del chunk
    weights_g = top_k_weights.reshape(-1)[pairs.perm]
    weighted = pairs.out * weights_g.to(pairs.out.dtype).unsqueeze(-1)
    return pairs.unsort(weighted).sum(dim=1).to(hidden_states.dtype)


def fp8_experts_class():
    """transformers' FP8Experts, decorated as its quantizer does (experts implementations through
    ALL_FP8_EXPERTS_FUNCTIONS), with the dequantizing forward registered. Once per process."""
    if not _FP8_CLASS:
        from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
        from transformers.integrations.moe import use_experts_implementation

        type(ALL_FP8_EXPERTS_FUNCTIONS).register(FP8_DEQUANTIZED_IMPL, dequantized_experts_forward)
        _FP8_CLASS.append(
            use_experts_implementation(
                experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS, has_bias=False, has_gate=True
            )
        )
    return _FP8_CLASS[0]


def fp8_kernels_load(device: torch.device) -> bool:
    """Whether transformers' FP8 expert kernels (its finegrained-fp8 Triton kernel) load for `device`."""
    if device.type != "cuda":
        return False
    try:
        from transformers.integrations.finegrained_fp8 import load_finegrained_fp8_kernel

        load_finegrained_fp8_kernel()
    except Exception:  # ImportError without `kernels`; a failed hub download; no build for this torch
        return False
    return True


def fp8_experts_keepable(quant: Quantization | None, layout) -> bool:
    """Whether the checkpoint's routed experts can stay FP8 in memory: FP8 block-wise, and every expert
    tensor a per-expert e4m3 `weight` with its `weight_scale_inv` (the layout of Qwen's and DeepSeek's
    releases), of projections whose rows split into whole blocks."""
    if quant is None or quant.format != "fp8" or not quant.block_size:
        return False
    names = [n for n in layout.tensors if ".experts." in n]
    per_expert = re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.(weight|weight_scale_inv)$")
    if not names or not all(per_expert.search(canonical(n)) for n in names):
        return False
    weights = [n for n in names if n.endswith(".weight")]
    if any(layout.tensors[n].dtype != "F8_E4M3" for n in weights):
        return False
    return len(weights) == len(names) - len(weights) and all(
        layout.tensors[n].shape[0] % quant.block_size[0] == 0 for n in weights
    )


def keep_fp8_experts(model: torch.nn.Module, block_size, dtype: torch.dtype) -> list[str]:
    """Replace every fused experts module of the meta-device `model` by transformers' FP8Experts (meta too,
    the same shapes in e4m3 plus block scales), as its FP8 quantizer does before loading. Returns their paths."""
    cls = fp8_experts_class()
    swapped = []
    for name, module in list(model.named_modules()):
        if not name.endswith(".experts") or not isinstance(getattr(module, "gate_up_proj", None), torch.Tensor):
            continue
        if getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
            continue
        if getattr(module, "is_transposed", False) or getattr(module, "config", None) is None:
            continue
        with torch.device("meta"):
            new = cls(config=module.config, block_size=tuple(block_size), activation_scheme="dynamic")
        if new.gate_up_proj.shape != module.gate_up_proj.shape or new.down_proj.shape != module.down_proj.shape:
            continue
        new._reap_compute_dtype = dtype
        model.set_submodule(name, new)
        swapped.append(name)
    return swapped


# ---- compressed-tensors, AWQ and GPTQ experts kept in memory as stored ------------------------------------
# In memory, a checkpoint whose routed experts are stored one by one (`experts.{j}.{gate,up,down}_proj`, each
# quantized: `qweight` / `qzeros` / `scales` (/ `g_idx`), `weight_packed` / `weight_scale` / ..., or a
# float-quantized `weight` + `weight_scale`) keeps them as stored: each experts module becomes a
# PackedExperts holding, per projection and on-disk part, one buffer [E, *part shape]. Whatever needs dense
# weights takes them through `ExpertWeights.experts(e0, e1)`, which dequantizes those experts then, every
# weight with the checkpoint's own `Dequantizer.weight` (the op the whole-model load and the streamed reader
# apply to the same tensors on the same device, so the same bits), and frees them with the chunk.

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
_PER_EXPERT_WEIGHT = re.compile(r"^(?P<head>.+\.experts)\.(?P<j>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight$")
# bytes per weight of the one projection being dequantized, besides the chunk: the unpacked integers, the
# gathered zeros and scales, the products and the cast (measured by the tests on every format, at most 20.8:
# GPTQ's unpacker)
DEQUANTIZE_TEMPORARY_BYTES = 24
_PACKED_CLASS: list = []


class PackedExperts(torch.nn.Module):
    """Routed experts kept in memory as the checkpoint stores them (see above). Buffers `<proj>__<leaf>`
    [E, *shape] (not persistent: they are no state of the original model); `names[proj][j]`: expert j's
    on-disk tensor names by leaf, the keys the Dequantizer is given."""

    def __init__(self, config, num_experts: int, hidden: int, inter: int, act_fn, parts: dict, names: dict):
        super().__init__()
        self.num_experts, self.hidden_dim, self.intermediate_dim = num_experts, hidden, inter
        self.act_fn = act_fn
        self.names = names
        self.dequantizer: Dequantizer | None = None
        self._reap_compute_dtype = torch.float32
        for proj, leaves in parts.items():
            for leaf, (shape, dtype) in leaves.items():
                meta = torch.empty((num_experts, *shape), dtype=dtype, device="meta")
                self.register_buffer(f"{proj}__{leaf}", meta, persistent=False)

    def weight(self, j: int, proj: str) -> torch.Tensor:
        """Expert j's dequantized `proj` weight [out, in] in the compute dtype."""
        tensors = {name: self._buffers[f"{proj}__{leaf}"][j] for leaf, name in self.names[proj][j].items()}
        return self.dequantizer.weight(tensors).to(self._reap_compute_dtype)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        return dequantized_experts_forward(self, hidden_states, top_k_index, top_k_weights)


def packed_experts_class():
    """PackedExperts decorated as transformers' experts classes are (implementations through its
    ExpertsInterface), with the dequantizing forward registered there. Once per process."""
    if not _PACKED_CLASS:
        from transformers.integrations.moe import ExpertsInterface, use_experts_implementation

        ExpertsInterface.register(PACKED_DEQUANTIZED_IMPL, dequantized_experts_forward)
        _PACKED_CLASS.append(use_experts_implementation(PackedExperts, has_bias=False, has_gate=True))
    return _PACKED_CLASS[0]


def packed_experts(original: torch.nn.Module, weights: dict, parts: dict, layout, dequantizer, dtype):
    """A PackedExperts (meta buffers) to replace the fused experts module `original`, or None where it does
    not fit: `weights` {(j, proj): logical weight name} must hold every projection of every expert, each
    quantized (`parts`: logical name -> on-disk tensors) with the same part shapes and dtypes for all experts,
    and `original` a plain gated experts module (no bias, transformers' act(gate) * up)."""
    from .moe.spec import _own_apply_gate, expert_weights

    E = getattr(original, "num_experts", None)
    config = getattr(original, "config", None)
    if not isinstance(E, int) or config is None or not hasattr(original, "act_fn") or _own_apply_gate(original):
        return None
    if set(weights) != {(j, proj) for j in range(E) for proj in PROJECTIONS}:
        return None
    if getattr(original, "has_bias", False) or not getattr(original, "has_gate", True):
        return None
    try:
        w = expert_weights(original)
    except (AttributeError, TypeError):
        return None
    inter, hidden = w.up.shape[1], w.up.shape[2]
    shapes: dict[str, dict] = {}
    names: dict[str, list] = {proj: [] for proj in PROJECTIONS}
    for proj in PROJECTIONS:
        for j in range(E):
            on_disk = parts[weights[(j, proj)]]
            if len(on_disk) < 2:
                return None
            leaves = {p.rpartition(".")[2]: (tuple(layout.tensors[p].shape), layout.tensors[p].dtype) for p in on_disk}
            if shapes.setdefault(proj, leaves) != leaves:
                return None
            names[proj].append({p.rpartition(".")[2]: p for p in on_disk})
    from safetensors.torch import _TYPES

    if any(d not in _TYPES for leaves in shapes.values() for _, d in leaves.values()):
        return None
    typed = {proj: {leaf: (shape, _TYPES[d]) for leaf, (shape, d) in leaves.items()} for proj, leaves in shapes.items()}
    with torch.device("meta"):
        module = packed_experts_class()(config, E, hidden, inter, original.act_fn, typed, names)
    module.dequantizer = dequantizer
    module._reap_compute_dtype = dtype
    return module


def packed_expert_weights(experts: torch.nn.Module):
    """moe.spec.ExpertWeights of a PackedExperts module: placeholders of the dense shapes (an expanded uint8
    zero: no memory, and no float kernel takes them) and `dequantize(e0, e1)`, which makes the dense weights of
    experts e0..e1 in the compute dtype, weight by weight into the chunk's tensors."""
    from .moe.spec import ExpertWeights, _glu

    dtype = experts._reap_compute_dtype
    E, H, inter = experts.num_experts, experts.hidden_dim, experts.intermediate_dim
    device = next(iter(experts.buffers())).device
    combine = _glu(experts.act_fn)

    def dense(e0: int, e1: int) -> ExpertWeights:
        e1 = min(e1, E)  # as slicing the dense tensors would
        gate_up = torch.empty((e1 - e0, 2 * inter, H), dtype=dtype, device=device)
        down = torch.empty((e1 - e0, H, inter), dtype=dtype, device=device)
        DEQUANTIZED.track(gate_up, down)
        for k, j in enumerate(range(e0, e1)):
            gate_up[k, :inter] = experts.weight(j, "gate_proj")
            gate_up[k, inter:] = experts.weight(j, "up_proj")
            down[k] = experts.weight(j, "down_proj")
        return ExpertWeights(gate_up[:, :inter], gate_up[:, inter:], down, None, None, None, combine, gate_up)

    zero = torch.zeros((), dtype=torch.uint8, device=device)
    size = torch.empty((), dtype=dtype).element_size()
    # the dense weights, and (at most one expert's worth) the temporaries of the projection being dequantized
    per_expert = inter * H * (3 * size + DEQUANTIZE_TEMPORARY_BYTES)
    gate_up = zero.expand(E, 2 * inter, H)
    return ExpertWeights(
        gate_up[:, :inter],
        gate_up[:, inter:],
        zero.expand(E, H, inter),
        None,
        None,
        None,
        combine,
        gate_up,
        dense,
        dtype,
        per_expert,
    )
