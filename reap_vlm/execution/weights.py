"""Read one decoder layer's weights at a time straight from the safetensors shards.

`LayerReader` maps every tensor of the checkpoint to the in-memory parameter it becomes, with
transformers' own loading conversions (`get_model_conversion_mapping`: per-expert tensors fused into
`gate_up_proj` / `down_proj`, Qwen3-VL's hub layout transposed, Mixtral's renames, ...), and groups
the tensors by decoder layer. The inventory (shards, offsets, dtypes, the index checked against the
headers) is reap_vlm.checkpoint.layout's. `load(i)` reads exactly layer i's tensors, tensor by
tensor at their offsets into buffers of their own (`read_tensor`; never a whole shard, never a mapping of
it), converts them with
`convert_and_load_state_dict_in_model` into the meta-device skeleton and checks that nothing of the
layer is left on the meta device; `release(i)` puts the layer's parameters back on the meta device.
`prefetch(i)` reads layer i's tensors in a background thread while the current layer computes.

A quantized checkpoint (reap_vlm.quantization) is read module by module: the on-disk parts of each
quantized weight (`weight` + `weight_scale_inv`, `qweight` / `qzeros` / `scales`, ...) are read together,
moved to the compute device and dequantized there, and transformers' conversions see plain weights.

Instrumented: `reads` counts how often each tensor was read, `peak_resident` is the largest number of
decoder layers whose weights were in memory at once (read, loaded or prefetched, not yet released).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

from ..checkpoint.layout import inspect_checkpoint
from ..errors import BugError, CheckpointError
from ..quantization import Dequantizer, canonical, detect

# Model types whose transformers conversions read only the fused hub layout, while quantized releases store
# experts one by one (Qwen3-VL's FP8 builds: experts.{j}.gate_proj.weight + weight_scale_inv): the per-expert
# converters of the named type are added when the checkpoint has per-expert names.
PER_EXPERT_CONVERSIONS = {"qwen3_vl_moe": "qwen2_moe"}
PAGE = 4096  # the page size of the mapping read_tensor imitates
OUTER = -1  # the group of every tensor outside the decoder layers (embeddings, vision tower, final norm, head)


def text_decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The module that runs the decoder layers (it owns `layers` and the final `norm`)."""
    base = getattr(model, "model", None)
    for candidate in (
        model.get_decoder() if hasattr(model, "get_decoder") else None,
        base,
        getattr(base, "language_model", None),
        getattr(model, "base_model", None),
    ):
        if isinstance(getattr(candidate, "layers", None), torch.nn.ModuleList):
            return candidate
    raise BugError(f"{type(model).__name__} has no decoder with a `layers` list")


def decoder_layers(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList]:
    """(module path, ModuleList) of the text decoder's layers."""
    layers = text_decoder(model).layers
    path = next(name for name, module in model.named_modules() if module is layers)
    return path, layers


def read_tensor(f, info) -> torch.Tensor:
    """One tensor of a safetensors shard (`info`: its checkpoint.layout.TensorInfo) read with `readinto` into
    a tensor of its own: the bytes safetensors' get_tensor gives, without mapping the file. safe_open maps
    the shard and its tensors are views of the mapping: the pages read stay in the process' RSS (as file
    pages) as long as any of its tensors lives, which added about one layer to the peak RSS of a streamed
    run (docs/design.md, "Memory bounds"). Safetensors stores little-endian bytes, as this machine does."""
    import sys

    from safetensors.torch import _TYPES

    if sys.byteorder != "little":
        raise BugError("the streamed layer reader assumes a little-endian machine, as safetensors stores")
    if info.dtype not in _TYPES:  # a dtype torch has no plain type for here: safetensors' own reader, copied
        from safetensors import safe_open

        with safe_open(f.name, framework="pt", device="cpu") as st:
            return st.get_tensor(info.name).clone()
    dtype = _TYPES[info.dtype]
    size = info.end - info.start
    if size != math.prod(info.shape) * dtype.itemsize:
        raise CheckpointError(
            f"{info.name} in {info.shard} has {size} bytes for shape {list(info.shape)} {info.dtype}",
            "the shard's header is inconsistent",
            "Check the checkpoint with ./run.sh verify",
        )
    if size == 0:
        return torch.empty(info.shape, dtype=dtype)
    # The buffer starts at the address offset (mod the page size) that the mapped file gives the tensor: the
    # in-memory path's CPU tensors are views of the mapped shard, and CPU kernels (oneDNN / MKL) choose their
    # blocking by alignment, so another alignment changes the last bits of a sum (measured: a candidate's KL
    # 1.1e-5 relative off the in-memory value with a 64-byte aligned buffer, equal with this one).
    raw = torch.empty(size + PAGE, dtype=torch.uint8)
    shift = (info.start - raw.data_ptr()) % PAGE
    if shift % dtype.itemsize:  # an offset the dtype cannot be viewed at (not written by safetensors >= 0.4)
        shift = (-raw.data_ptr()) % PAGE
    out = raw[shift : shift + size].view(dtype).view(info.shape)
    view = memoryview(out.reshape(-1).view(torch.uint8).numpy())
    f.seek(info.start)
    done = 0
    while done < size:
        n = f.readinto(view[done:])
        if not n:
            raise CheckpointError(
                f"{info.shard} ends inside {info.name}", "the shard is truncated", "Download or copy it again"
            )
        done += n
    return out


def _meta(module: torch.nn.Module) -> list[str]:
    return [n for n, t in [*module.named_parameters(), *module.named_buffers()] if t.is_meta]


class LayerReader:
    def __init__(
        self,
        model_dir: Path,
        model: torch.nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        keep_fp8_experts: bool = False,
        keep_packed_experts: bool = False,
    ):
        """keep_fp8_experts: the model's experts are transformers' FP8Experts (quantization.keep_fp8_experts);
        the experts' e4m3 weights and block scales are loaded as they are, fused by transformers' conversions
        with the copies its FP8 quantizer adds for the scales; every other quantized weight is dequantized.

        keep_packed_experts (compressed-tensors, AWQ, GPTQ): every experts module whose experts are stored one
        by one, each projection quantized, is replaced here by a quantization.PackedExperts, and the experts'
        on-disk parts are loaded into its buffers as they are (`packed_modules`: the paths replaced); every
        other quantized weight is dequantized."""
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        self.model_dir, self.model, self.device, self.dtype = Path(model_dir), model, torch.device(device), dtype
        self.layout = inspect_checkpoint(model_dir)
        self.layers_path, self.layers = decoder_layers(model)
        self.mapping = get_model_conversion_mapping(model)
        renamings = [w for w in self.mapping if isinstance(w, WeightRenaming)]
        converters = [w for w in self.mapping if isinstance(w, WeightConverter)]
        targets = model.state_dict()
        prefix = model.base_model_prefix
        self.groups: dict[int, list[str]] = {OUTER: [], **{i: [] for i in range(len(self.layers))}}
        self.target: dict[str, str] = {}  # weight name -> in-memory parameter it (partly) becomes
        self.unused: list[str] = []  # tensors the model has no parameter for (an MTP layer, ...): never read
        # weight name -> the on-disk tensors it is read from: itself, or a quantized module's parts
        self.quantization = detect(self.layout.config, self.layout)
        self.dequantizer = None
        self.parts: dict[str, tuple[str, ...]] = {n: (n,) for n in self.layout.tensors}
        if self.quantization is not None:
            self.dequantizer = Dequantizer(model_dir, self.layout.config, self.quantization)
            plan, self.unused = self.dequantizer.plan(self.layout.tensors)
            self.parts = {canonical(n): parts for n, parts in plan.items()}
            if keep_fp8_experts:  # the experts' parts are read as they are, each its own tensor
                for name in [n for n, parts in self.parts.items() if ".experts." in n and len(parts) > 1]:
                    for part in self.parts.pop(name):
                        self.parts[canonical(part)] = (part,)
        extra = PER_EXPERT_CONVERSIONS.get(getattr(model.config, "model_type", ""))
        if extra and any(".experts.0." in n for n in self.parts):
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            self.mapping = [*self.mapping, *get_checkpoint_conversion_mapping(extra)]
            renamings = [w for w in self.mapping if isinstance(w, WeightRenaming)]
            converters = [w for w in self.mapping if isinstance(w, WeightConverter)]
        if keep_fp8_experts:
            from transformers import FineGrainedFP8Config
            from transformers.quantizers.base import HfQuantizer
            from transformers.quantizers.quantizer_finegrained_fp8 import FineGrainedFP8HfQuantizer

            fp8 = FineGrainedFP8HfQuantizer(
                FineGrainedFP8Config(weight_block_size=list(self.quantization.block_size)), pre_quantized=True
            )
            # the converters' copies for `*_scale_inv` (the base rule, without the FP8 quantizer's renames of
            # other scale names, which this checkpoint does not have)
            self.mapping = HfQuantizer.update_weight_conversions(fp8, self.mapping, model)
            renamings = [w for w in self.mapping if isinstance(w, WeightRenaming)]
            converters = [w for w in self.mapping if isinstance(w, WeightConverter)]
        head = self.layers_path + "."
        for name in self.parts:
            renamed, _ = rename_source_key(name, renamings, converters, prefix, targets)
            if renamed not in targets and name in targets:
                renamed, _ = rename_source_key(name, [], [], prefix, targets)
            if renamed not in targets:
                self.unused.append(name)
                continue
            self.target[name] = renamed
            group = int(renamed[len(head) :].split(".", 1)[0]) if renamed.startswith(head) else OUTER
            self.groups[group].append(name)
        # logical expert weight -> (PackedExperts path, expert, projection): read as stored, not dequantized
        self.packed: dict[str, tuple[str, int, str]] = {}
        self.packed_modules: list[str] = []
        if keep_packed_experts and self.dequantizer is not None and self.quantization.format != "fp8":
            self._pack_experts()
        self.reads: Counter[str] = Counter()
        self.resident: set[int] = set()
        self.peak_resident = 0  # decoder layers only; OUTER is not a layer
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[int, Future] = {}

    def _pack_experts(self) -> None:
        """Replace the experts modules by PackedExperts, their weights then read as stored: all of them or
        none (they share the config whose experts implementation selects the forward), so only where every
        experts module's experts are stored quantized one by one and fit (quantization.packed_experts)."""
        from ..quantization import _PER_EXPERT_WEIGHT, packed_experts

        by_module: dict[str, dict[tuple[int, str], str]] = {}
        for name, target in self.target.items():
            m = _PER_EXPERT_WEIGHT.match(name)
            if m is not None and len(self.parts[name]) > 1:
                by_module.setdefault(target.rpartition(".")[0], {})[(int(m["j"]), m["proj"])] = name
        experts = [n for n, m in self.model.named_modules() if n.endswith(".experts") and hasattr(m, "down_proj")]
        if not experts or set(experts) != set(by_module):
            return
        made = {}
        for path, weights in by_module.items():
            original = self.model.get_submodule(path)
            made[path] = packed_experts(original, weights, self.parts, self.layout, self.dequantizer, self.dtype)
            if made[path] is None:  # this one does not fit: every module is left to the dequantizing load
                return
        for path, module in made.items():
            self.model.set_submodule(path, module)
            self.packed_modules.append(path)
            self.packed.update({name: (path, j, proj) for (j, proj), name in by_module[path].items()})

    # ---- sizes ---------------------------------------------------------------------------------
    def nbytes(self, group: int) -> int:
        return sum(self.layout.tensors[p].nbytes for n in self.groups[group] for p in self.parts[n])

    def largest_layer_bytes(self) -> int:
        return max((self.nbytes(i) for i in range(len(self.layers))), default=0)

    # ---- reading -------------------------------------------------------------------------------
    def _mark(self, group: int) -> None:
        with self._lock:
            if group != OUTER:
                self.resident.add(group)
                self.peak_resident = max(self.peak_resident, len(self.resident))

    def _read(self, group: int) -> dict[str, torch.Tensor]:
        """The group's tensors, tensor by tensor, shard by shard in file order (read_tensor: into buffers of
        their own, no mapping of the shard)."""
        self._mark(group)
        by_shard: dict[str, list[str]] = {}
        for name in self.groups[group]:
            for part in self.parts[name]:
                by_shard.setdefault(self.layout.tensors[part].shard, []).append(part)
        read = {}
        for shard, names in by_shard.items():
            names.sort(key=lambda n: self.layout.tensors[n].start)
            with open(self.model_dir / shard, "rb", buffering=0) as f:
                for name in names:
                    read[name] = read_tensor(f, self.layout.tensors[name])
                    with self._lock:
                        self.reads[name] += 1
        if self.dequantizer is None:
            return read
        out = {}
        for name in self.groups[group]:
            if len(self.parts[name]) == 1:  # a plain tensor
                out[name] = read.pop(self.parts[name][0])
                continue
            parts = {p: read.pop(p).to(self.device) for p in self.parts[name]}
            if name in self.packed:  # into its PackedExperts as stored (load)
                out[name] = parts
                continue
            out[name] = self.dequantizer.weight(parts).to(self.dtype)
        return out

    def _fill_packed(self, parts_of: dict[str, dict[str, torch.Tensor]]) -> None:
        """Expert weights read as stored ({logical name: {on-disk name: tensor}}) -> their PackedExperts'
        buffers [E, ...], allocated on the device at the first expert."""
        for name, parts in parts_of.items():
            path, j, proj = self.packed[name]
            module = self.model.get_submodule(path)
            for part, tensor in parts.items():
                key = f"{proj}__{part.rpartition('.')[2]}"
                buf = module._buffers[key]
                if tuple(buf.shape[1:]) != tuple(tensor.shape) or buf.dtype != tensor.dtype:
                    raise CheckpointError(
                        f"{part} has shape {list(tensor.shape)} {tensor.dtype}, expert 0's {list(buf.shape[1:])}",
                        "the experts of one layer are stored in different shapes",
                        "Check the checkpoint with ./run.sh verify",
                    )
                if buf.is_meta:
                    buf = module._buffers[key] = torch.empty(buf.shape, dtype=buf.dtype, device=self.device)
                buf[j].copy_(tensor)

    def prefetch(self, group: int) -> None:
        if group in self.groups and group not in self._pending:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reap-prefetch")
            self._pending[group] = self._pool.submit(self._read, group)

    def load(self, group: int) -> int:
        """Read (or take the prefetched) tensors of `group` and put them into the model. Returns bytes read."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        pending = self._pending.pop(group, None)
        tensors = pending.result() if pending is not None else self._read(group)
        packed = {n: tensors.pop(n) for n in [n for n in tensors if n in self.packed]}
        config = LoadStateDictConfig(
            device_map={"": self.device},
            dtype=self.dtype,
            dtype_plan=self.model._get_dtype_plan(self.dtype),
            weight_mapping=self.mapping,
        )
        from transformers.utils import logging as hf_logging

        quiet = hf_logging.is_progress_bar_enabled()
        if quiet:  # transformers' "Loading weights" bar, once per layer, would flood the log
            hf_logging.disable_progress_bar()
        try:
            info, _ = convert_and_load_state_dict_in_model(self.model, tensors, config)
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
        del tensors
        self._fill_packed(packed)
        del packed
        module = self.model if group == OUTER else self.layers[group]
        problems = [*info.mismatched_keys, *info.conversion_errors]
        if problems:
            raise CheckpointError(
                f"the checkpoint's tensors do not fit the model: {str(problems[0])[:200]}",
                "config.json and the shards disagree",
                "Check the checkpoint with ./run.sh verify",
            )
        if group == OUTER:
            self.model.tie_weights()
            self._buffers_to(self.model, skip=self.layers_path + ".")
            missing = [n for n in _meta(self.model) if not n.startswith(self.layers_path + ".")]
        else:
            self._buffers_to(module)
            missing = _meta(module)
        if missing:
            where = "outside the decoder layers" if group == OUTER else f"decoder layer {group}"
            raise CheckpointError(
                f"the checkpoint has no tensor for {missing[0]} ({where})",
                "streamed execution reads every parameter from the shards and initialises none",
                "Check that the checkpoint is complete (./run.sh verify)",
            )
        return self.nbytes(group)

    def _buffers_to(self, module: torch.nn.Module, skip: str | None = None) -> None:
        for name, buf in list(module.named_buffers()):
            if (skip and name.startswith(skip)) or buf.is_meta or buf.device == self.device:
                continue
            owner, _, leaf = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            sub._buffers[leaf] = buf.to(self.device)

    def release(self, group: int) -> None:
        """Put the layer's parameters back on the meta device (its memory is freed)."""
        module = self.layers[group]
        for name, param in list(module.named_parameters()):
            owner, _, leaf = name.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            sub._parameters[leaf] = torch.nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
        with self._lock:
            self.resident.discard(group)

    def close(self) -> None:
        for pending in self._pending.values():
            pending.cancel()
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
