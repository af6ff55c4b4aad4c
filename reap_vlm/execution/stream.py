"""Streamed execution: score a model larger than the GPU (and than RAM) one decoder layer at a time.

1. The model is built on the meta device from its config (parameters on meta, buffers real), and
   the parts outside the decoder layers (embeddings, vision tower, merger, final norm, head) are read
   from the shards once.
2. Capture: every batch runs through the model's own forward with each decoder layer replaced by a
   recorder that keeps the arguments the model passes it (position embeddings, 3-D M-RoPE position
   ids, the mask of the layer's attention type, token-type ids, ...) and returns its input; the
   forward stops at the final norm. What a family does between layers (Qwen3-VL's deepstack
   injection) is a named method of the decoder (`Replay.between`): its arguments are recorded too.
   So the masks, position ids and features are the model's own, not re-derived here.
3. For each decoder layer in order: its tensors are read from the shards (weights.LayerReader; the
   next layer is prefetched meanwhile), every cached batch runs through it with the recorded
   arguments, the between-layer methods are replayed, the outputs replace the cached inputs, and
   the layer goes back to the meta device. The hidden states stay in RAM up to a budget, above it in
   a spill folder that is removed afterwards.

Each stream of batches (calibration; later held-out plans) gets a context per layer: the calibration
stream's is an Observer of that layer's MoE blocks, the very class the in-memory path uses.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BugError, UnsupportedModelError
from ..quantization import FORMATS as QUANT_METHODS
from .memory import prepare_inputs
from .weights import OUTER, LayerReader, decoder_layers, text_decoder

# What the CPU bound allows beyond its named terms: Python objects of the stage (samples, tokenizer, rows),
# the accumulators, allocator fragmentation (docs/design.md, "Memory bounds").
PROCESS_SLACK = 2**29


@dataclass(frozen=True)
class Replay:
    """What a family adds between decoder layers, as data: methods of the decoder module that the
    model's forward calls on the hidden states after a layer (`method(hidden, *recorded)`)."""

    between: tuple[str, ...] = ()


# Families whose streamed scoring is tested equal to the in-memory path (tests/test_stream.py).
STREAMABLE: dict[str, Replay] = {
    "qwen3_vl_moe": Replay(between=("_deepstack_process",)),
    "qwen3_moe": Replay(),
    "mixtral": Replay(),
    "deepseek_v3": Replay(),
    "gpt_oss": Replay(),
    "qwen2_moe": Replay(),
    "olmoe": Replay(),
    "glm4_moe": Replay(),
    "ernie4_5_vl_moe": Replay(),
    "llama4_text": Replay(),
    "glm4v_moe": Replay(),
    # verified 2026-12-02 with the same tests (statistics in all three modes, the stage's metadata and table)
    **{
        name: Replay()
        for name in (
            "afmoe",
            "aria",
            "aria_text",
            "axk1",
            "bailing_hybrid",
            "deepseek_v2",
            "dots1",
            "ernie4_5_moe",
            "exaone_moe",
            "flex_olmo",
            "flint",
            "gemma4_text",
            "glm4_moe_lite",
            "granitemoe",
            "granitemoe_swa",
            "granitemoehybrid",
            "granitemoeshared",
            "hunyuan_v1_moe",
            "hy_v3",
            "kimi_linear",
            "kolibri1",
            "laguna",
            "llama4",
            "longcat_flash",
            "mellum",
            "mimo_v2_flash",
            "minimax",
            "minimax_m2",
            "minimax_m3_vl",
            "minimax_m3_vl_text",
            "phimoe",
            "qwen3_5_moe_text",
            "qwen3_next",
            "solar_open",
        )
    },
}


def check_streamable(config: dict) -> None:
    """Refuse, before anything is loaded, a family whose streamed execution is not verified."""
    model_type = config.get("model_type", "")
    if model_type not in STREAMABLE:
        raise UnsupportedModelError(
            f"REAP_EXECUTION=stream does not support {model_type or 'this model'} yet",
            "streamed scoring is verified equal to the in-memory path only for " + ", ".join(sorted(STREAMABLE)),
            "Use REAP_EXECUTION=memory (the model must fit the GPUs, or CPU memory)",
        )
    quantization = (config.get("quantization_config") or {}).get("quant_method")
    if quantization and quantization not in QUANT_METHODS:
        raise UnsupportedModelError(
            f"REAP_EXECUTION=stream does not read {quantization}-quantized checkpoints",
            "the layer reader dequantizes " + ", ".join(QUANT_METHODS) + " checkpoints",
            "Score the unquantized (bf16) checkpoint, or a supported export of it",
        )


def check_settings(settings, config: dict) -> None:
    """Everything streamed scoring refuses, said before a tensor is read."""
    from ..errors import SettingsError

    check_streamable(config)
    if settings.resume or settings.checkpoint_every:
        raise SettingsError(
            "REAP_EXECUTION=stream has no accumulator checkpoints",
            "they are saved between batches, and streamed execution passes over the layers instead",
            "Unset REAP_RESUME and REAP_CHECKPOINT_EVERY, or use REAP_EXECUTION=memory",
        )


class _Stop(Exception):
    """Raised at the final norm: the capture pass has everything it needs."""


@dataclass
class Captured:
    """What the model's forward passed to its decoder layers for one batch."""

    layer_args: list[tuple[tuple, dict]] = field(default_factory=list)  # per layer: (args after hidden, kwargs)
    between: dict[int, list[tuple[str, tuple, dict]]] = field(default_factory=dict)  # after layer i
    hidden: torch.Tensor | None = None  # the input of the first layer


class _Recorder(torch.nn.Module):
    def __init__(self, index: int, record: Captured):
        super().__init__()
        self.index, self.record = index, record

    def forward(self, *args, **kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if self.index == 0:
            self.record.hidden = hidden
        self.record.layer_args.append((tuple(args[1:]), dict(kwargs)))
        return hidden


class HiddenCache:
    """Hidden states per key, in three tiers: on the GPU while they fit `gpu_bytes` (no copy at all: a
    layer's output stays where it was computed), then in RAM (CPU, pinned on a GPU machine so the copies
    are DMA) while they fit `limit_bytes`, then files in a spill folder created under `spill_parent` and
    removed by close(). A key that is put again keeps its tier and, in RAM, its buffer (copied into)."""

    def __init__(
        self,
        limit_bytes: int,
        spill_parent: Path | None = None,
        pin: bool = False,
        gpu_bytes: int = 0,
        device: torch.device | None = None,
    ):
        self.limit, self.spill_parent, self.pin, self.gpu_limit = limit_bytes, spill_parent, pin, gpu_bytes
        self.device = device
        self._gpu: dict = {}
        self._ram: dict = {}
        self._files: dict = {}
        self.gpu_bytes = self.peak_gpu_bytes = 0
        self.ram_bytes = self.peak_ram_bytes = 0
        self.spilled_writes = self.spilled_reads = 0
        self._dir: Path | None = None

    @staticmethod
    def _size(tensor: torch.Tensor) -> int:
        return tensor.numel() * tensor.element_size()

    def put(self, key, tensor: torch.Tensor) -> None:
        size = self._size(tensor)
        old = self._ram.get(key)
        if old is not None and old.shape == tensor.shape and old.dtype == tensor.dtype:
            old.copy_(tensor)  # the same buffer again (pinned buffers are costly to allocate)
            return
        self._drop(key)
        if self.device is not None and self.gpu_bytes + size <= self.gpu_limit:
            self._gpu[key] = tensor.to(self.device)
            self.gpu_bytes += size
            self.peak_gpu_bytes = max(self.peak_gpu_bytes, self.gpu_bytes)
            return
        if self.ram_bytes + size <= self.limit:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self.pin)
            buffer.copy_(tensor)
            self._ram[key] = buffer
            self.ram_bytes += size
            self.peak_ram_bytes = max(self.peak_ram_bytes, self.ram_bytes)
            return
        if self._dir is None:
            parent = self.spill_parent if self.spill_parent is not None else Path(tempfile.gettempdir())
            parent.mkdir(parents=True, exist_ok=True)
            self._dir = Path(tempfile.mkdtemp(prefix=".reap_stream_", dir=parent))
        path = self._dir / f"{len(self._files)}-{self.spilled_writes}.pt"
        torch.save(tensor.detach().cpu(), path)
        self._files[key] = path
        self.spilled_writes += 1

    def get(self, key) -> torch.Tensor:
        if key in self._gpu:
            return self._gpu[key]
        if key in self._ram:
            return self._ram[key]
        self.spilled_reads += 1
        return torch.load(self._files[key], weights_only=True)

    def promote(self, gpu_bytes: int, device: torch.device) -> None:
        """Give the cache a GPU tier of `gpu_bytes` on `device` and move entries there (RAM ones first, then
        spilled ones) while they fit: the capture fills the cache before the GPU's room is known."""
        self.gpu_limit, self.device = gpu_bytes, device
        for key in [*self._ram, *self._files]:
            if self.gpu_bytes >= self.gpu_limit:
                break
            tensor = self._ram.get(key)
            size = self._size(tensor) if tensor is not None else None
            if size is None:
                tensor = self.get(key)
                size = self._size(tensor)
            if self.gpu_bytes + size > self.gpu_limit:
                continue
            moved = tensor.to(device)
            self._drop(key)
            self._gpu[key] = moved
            self.gpu_bytes += size
            self.peak_gpu_bytes = max(self.peak_gpu_bytes, self.gpu_bytes)

    def __contains__(self, key) -> bool:
        return key in self._gpu or key in self._ram or key in self._files

    def drop(self, key) -> None:
        self._drop(key)

    def _drop(self, key) -> None:
        old = self._gpu.pop(key, None)
        if old is not None:
            self.gpu_bytes -= self._size(old)
        old = self._ram.pop(key, None)
        if old is not None:
            self.ram_bytes -= self._size(old)
        path = self._files.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    @property
    def spill_dir(self) -> Path | None:
        return self._dir

    def close(self) -> None:
        self._gpu.clear()
        self._ram.clear()
        self._files.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)  # the folder this cache created, nothing else
            self._dir = None


@dataclass
class Stream:
    """A list of batches that goes through every layer. `layer_context(i, blocks)` is entered around
    layer i's pass over the batches; `before_batch(batch)` runs before each batch's layer forward."""

    batches: list
    layer_context: Callable[[int], contextlib.AbstractContextManager] = lambda i: contextlib.nullcontext()
    before_batch: Callable[[object], None] = lambda batch: None


def _to(obj, device: torch.device, memo: dict | None = None):
    """`obj` with every tensor on `device`. With `memo`, a tensor met twice (the position embeddings every
    layer gets) is copied once and stays shared."""
    if isinstance(obj, torch.Tensor):
        if memo is None:
            return obj.to(device)
        if id(obj) not in memo:
            memo[id(obj)] = (obj, obj.to(device))  # the source is kept so that its id stays unique
        return memo[id(obj)][1]
    if isinstance(obj, tuple):
        return tuple(_to(o, device, memo) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device, memo) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device, memo) for k, v in obj.items()}
    return obj


def _rss(field: str = "VmHWM") -> int | None:
    """VmRSS (resident now) or VmHWM (the peak so far) of this process from /proc/self/status, in bytes."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _inputs_nbytes(batch) -> int:
    return sum(t.numel() * t.element_size() for t in batch.inputs.values() if isinstance(t, torch.Tensor))


def _available_ram() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _args_bytes(captured) -> int:
    """Bytes of the distinct tensors of the captured layer arguments."""
    seen: dict[int, int] = {}

    def walk(obj) -> None:
        if isinstance(obj, torch.Tensor):
            seen[id(obj)] = obj.numel() * obj.element_size()
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                walk(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                walk(o)

    for record in captured:
        walk(record.layer_args)
        walk(record.between)
    return sum(seen.values())


def resolve_dtype(dtype: str, device: torch.device, config: dict) -> torch.dtype:
    from ..loading import DTYPES
    from ..loading import resolve_dtype as memory_dtype

    resolved = memory_dtype(dtype, device.type)
    if resolved != "auto":
        return resolved
    text = config.get("text_config") or {}
    name = config.get("dtype") or config.get("torch_dtype") or text.get("dtype") or text.get("torch_dtype")
    return DTYPES.get(str(name), torch.bfloat16)


def resolve_device(device: str) -> torch.device:
    from ..loading import resolve_device as memory_device

    resolved = memory_device(device)
    if resolved == "auto":
        return torch.device("cuda:0")
    return torch.device("cuda:0" if resolved == "cuda" else resolved)


class StreamedModel:
    """The meta-device skeleton of a checkpoint with its outer parts loaded, and the layer driver."""

    def __init__(
        self,
        model_dir: Path,
        *,
        device: str = "cpu",
        dtype: str = "auto",
        attn_implementation: str = "",
        trust_remote_code: bool = False,
        cache_bytes: int = 32 * 2**30,
        spill_parent: Path | None = None,
        prefetch: bool = True,
        chunk_bytes: int = 768 * 2**20,
        load_outer: bool = True,
    ):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

        from ..loading import is_vision_language, load_processor, read_config

        config = read_config(model_dir)
        check_streamable(config)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device, config)
        self.replay = STREAMABLE[config["model_type"]]
        self.cache_bytes, self.spill_parent, self.prefetch = cache_bytes, spill_parent, prefetch
        hf_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
        kwargs: dict = {"dtype": self.dtype, "trust_remote_code": trust_remote_code}
        if attn_implementation:
            kwargs["attn_implementation"] = attn_implementation
        with init_empty_weights(include_buffers=False):  # parameters on meta, buffers (rotary tables) real
            self.model = auto.from_config(hf_config, **kwargs)
        self.model.eval()
        self.processor = load_processor(model_dir, trust_remote_code)
        self.layers_path, self.layers = decoder_layers(self.model)
        self.decoder = text_decoder(self.model)
        if not isinstance(getattr(self.decoder, "norm", None), torch.nn.Module):
            raise BugError(f"{type(self.decoder).__name__} has no final norm to stop the capture at")
        if self.device.type == "cuda":  # the CUDA context and cuBLAS' host memory belong to the baseline
            one = torch.ones(8, 8, device=self.device)
            (one @ one).sum().item()
        self.baseline_rss = _rss("VmRSS") or 0  # the process before any weight is read ("Memory bounds")
        self.input_bytes = 0  # the batches' input tensors (pixel values included), each distinct batch once
        self._inputs_seen: set[int] = set()
        self.merge_bytes = 0  # the merge statistics' tensors of the last statistics' pass (in RAM)
        self.merge_features = 0  # bytes of the merge candidate's alignment features of a block (merge._features)
        self.reader = LayerReader(model_dir, self.model, device=self.device, dtype=self.dtype)
        if load_outer:  # False: the caller loads them (reader.load(OUTER)) or runs another model's instead
            self.reader.load(OUTER)
        self.chunk_bytes = chunk_bytes
        self.last_cache: HiddenCache | None = None
        self.measured: Measured | None = None  # the candidate plans measured in the statistics' pass
        self.answered = 0  # plans run_plans answered from that pass
        self.extra_passes = 0  # passes over the weights run_plans needed besides it (the greedy search)
        self.timings: dict[str, float] = {}  # seconds per phase: capture, load, compute, plans, merge, head
        self.cache_peaks: dict = {}  # the last pass's cache: budgets, peaks, spilled writes (memory_report)

    # ---- capture -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _recording(self, record: Captured) -> Iterator[None]:
        originals = list(self.layers)
        for i in range(len(originals)):
            self.layers[i] = _Recorder(i, record)

        def recorder(name: str):
            def between(hidden, *args, **kwargs):
                record.between.setdefault(len(record.layer_args) - 1, []).append((name, args, kwargs))
                return hidden

            return between

        for name in self.replay.between:
            setattr(self.decoder, name, recorder(name))  # an instance attribute shadows the method

        def stop(_module, _args):
            raise _Stop

        hook = self.decoder.norm.register_forward_pre_hook(stop)
        try:
            yield
        finally:
            hook.remove()
            for name in self.replay.between:
                self.decoder.__dict__.pop(name, None)
            for i, layer in enumerate(originals):
                self.layers[i] = layer

    def capture(self, batch) -> Captured:
        record = Captured()
        with self._recording(record):
            try:
                self.model(**prepare_inputs(self.model, batch, self.device), use_cache=False)
            except _Stop:
                pass
            else:
                raise BugError("the capture pass never reached the decoder's final norm")
        if len(record.layer_args) != len(self.layers) or record.hidden is None:
            raise BugError(f"the forward called {len(record.layer_args)} of {len(self.layers)} decoder layers")
        if self.device.type == "cpu":
            return record
        memo: dict = {}
        return Captured(
            _to(record.layer_args, torch.device("cpu"), memo),
            _to(record.between, torch.device("cpu"), memo),
            record.hidden.to("cpu"),  # the cache decides its tier once the GPU budget is known
        )

    # ---- memory ----------------------------------------------------------------------------------
    def layer_bytes(self) -> int:
        """The largest decoder layer's weights in the compute dtype (bytes), from the skeleton's shapes."""
        item = torch.empty(0, dtype=self.dtype).element_size()
        return max((sum(p.numel() for p in layer.parameters()) * item for layer in self.layers), default=0)

    def reserve_bytes(self) -> int:
        """What a layer's pass needs on the device besides the cached states (docs/design.md, "Memory
        bounds"): the resident and the prefetched layer (or a layer's raw and converted tensors while it is
        loaded), the chunk budget of the all-expert computation, and 1 GiB for one batch's activations; with
        the merge candidate measured in the pass at least the resident layer + the float32 alignment features
        of a block's experts (`merge_features`) + 1 GiB, which is more where a layer's experts in float32
        exceed one layer + the chunk budget (they are 2 x its expert weights in bf16)."""
        layer = self.layer_bytes()
        return max(2 * layer + self.chunk_bytes, layer + self.merge_features) + 2**30

    def _gpu_cache_bytes(self) -> int:
        """GPU bytes the hidden-state cache may use: what the process may allocate (the device's memory,
        or less under torch.cuda.set_per_process_memory_fraction) minus what is allocated and the reserve.
        Refuses, before a layer is read, a GPU that cannot hold the reserve."""
        if self.device.type != "cuda":
            return 0
        from ..errors import DeviceError

        index = self.device.index or 0
        total = torch.cuda.get_device_properties(index).total_memory
        get_fraction = getattr(torch.cuda, "get_per_process_memory_fraction", None)
        allowed = total * (get_fraction(index) if get_fraction else 1.0)
        free, _ = torch.cuda.mem_get_info(index)
        used = torch.cuda.memory_allocated(index)
        available = min(allowed - used, free + torch.cuda.memory_reserved(index) - used)
        reserve = self.reserve_bytes()
        if available < reserve:
            raise DeviceError(
                f"streamed execution needs {reserve / 2**30:.1f} GiB on {self.device} and "
                f"{max(available, 0) / 2**30:.1f} GiB are available",
                "two decoder layers, the chunk budget (REAP_CHUNK_MEMORY_MB) and one batch's activations must fit",
                "Free the GPU, lower REAP_CHUNK_MEMORY_MB, or use a larger GPU",
            )
        return int(0.9 * (available - reserve))  # 10 % slack for the allocator's fragmentation

    def outer_bytes(self) -> int:
        """The parts outside the decoder layers in the compute dtype (bytes)."""
        item = torch.empty(0, dtype=self.dtype).element_size()
        skip = self.layers_path + "."
        return sum(p.numel() for n, p in self.model.named_parameters() if not n.startswith(skip)) * item

    def _ram_cache_bytes(self, quiet: bool = False) -> int:
        """REAP_STREAM_CACHE_GB, or less where the machine's available memory cannot hold it beside the
        two layers, the outer parts and 2 GiB for the process (the rest spills; the numbers are the same)."""
        available = _available_ram()
        if available is None:
            return self.cache_bytes
        room = max(0, available - 2 * self.layer_bytes() - self.outer_bytes() - 2 * 2**30)
        if room < self.cache_bytes and not quiet:
            from .. import console

            console.info(  # stderr: stdout carries only the --json result line
                f"note: streamed execution keeps {room / 2**30:.1f} GiB of hidden states in RAM, not "
                f"REAP_STREAM_CACHE_GB={self.cache_bytes / 2**30:g}: that is what the available memory allows; "
                "the rest spills to disk"
            )
        return min(self.cache_bytes, room)

    def memory_report(self) -> dict:
        """What the bounds of docs/design.md ("Memory bounds") are made of, in GiB, and the cache's peaks."""
        gib = 2**30
        out = {
            "largest_layer_gib": self.layer_bytes() / gib,
            "outer_parts_gib": self.outer_bytes() / gib,
            "reserve_gib": self.reserve_bytes() / gib,
        }
        out.update({k: v / gib if k.endswith("_gib") else v for k, v in self.cache_peaks.items()})
        out["baseline_rss_gib"] = self.baseline_rss / gib
        out["inputs_gib"] = self.input_bytes / gib
        out["merge_stats_gib"] = self.merge_bytes / gib
        out["merge_features_gib"] = self.merge_features / gib
        out["cpu_bound_gib"] = self.cpu_bound_bytes() / gib
        peak = _rss("VmHWM")
        if peak is not None:
            out["cpu_peak_rss_gib"] = peak / gib  # the process' peak so far (its whole life, not only this stage)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}

    def cpu_bound_bytes(self) -> int:
        """docs/design.md, "Memory bounds": the process' RSS before any weight was read (interpreter,
        libraries, the CUDA context) + the batches' input tensors + the peaks of the cache's RAM tier and of
        the captured layer arguments + 2 layers (the prefetched one as read, the one being loaded) + the outer
        parts + the merge statistics (their sampled activations are kept in RAM) + PROCESS_SLACK; on a CPU
        device also what a GPU would hold: the chunk budget, the head's metrics chunk
        (candidates.METRICS_CHUNK_BYTES), 1 GiB for one batch's activations, and a third layer."""
        from ..candidates import METRICS_CHUNK_BYTES

        peaks = self.cache_peaks
        out = self.baseline_rss + self.input_bytes + peaks.get("ram_cache_peak_gib", 0)
        out += peaks.get("captured_args_gib", 0) + 2 * self.layer_bytes() + self.outer_bytes()
        out += self.merge_bytes + PROCESS_SLACK
        if self.device.type == "cpu":  # what a GPU would hold: the chunks, the head's metrics, a batch, and a
            # third layer: a layer fused at load (experts stored one by one) has its raw tensors, transformers'
            # stacked intermediate and the result alive at once, in RAM when the device is the CPU
            out += self.chunk_bytes + METRICS_CHUNK_BYTES + 2**30 + self.layer_bytes()
        return int(out)

    def _outer_to(self, device: torch.device, *, head_only: bool = False) -> None:
        """Move the parts outside the decoder layers (all of them, or only the final norm and the LM head)
        between the device and the CPU: on a GPU they are not resident during the layer pass."""
        if self.device.type == "cpu":
            return
        skip = self.layers_path + "."
        head = self.model.get_output_embeddings()
        keep = {id(p) for m in (head, self.decoder.norm) for p in m.parameters()}
        for name, param in list(self.model.named_parameters()):
            if name.startswith(skip) or param.is_meta or (head_only and id(param) not in keep):
                continue
            if param.device != device:
                owner, _, leaf = name.rpartition(".")
                sub = self.model.get_submodule(owner) if owner else self.model
                sub._parameters[leaf] = torch.nn.Parameter(param.data.to(device), requires_grad=False)
        self.model.tie_weights()

    # ---- the pass over the layers ------------------------------------------------------------
    def _clock(self, phase: str, started: float) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - started
        return now

    def _begin(self, keyed: list[tuple[object, object]]) -> tuple[HiddenCache, dict[int, Captured]]:
        """Capture every distinct batch of `keyed` ((cache key, batch) pairs) once and put its first-layer
        input into a new cache under each of its keys right away, so the captured states are never all in
        RAM beside the cache (only what the cache's RAM tier holds, plus one batch). During the capture the
        outer parts are on the device and the cache has no GPU tier; afterwards the outer parts go to the
        CPU and the entries move to the GPU tier as far as its budget allows. Returns (cache, the captured
        records by id(batch), their hidden states dropped)."""
        keys: dict[int, list] = {}
        batches: dict[int, object] = {}
        for key, batch in keyed:
            keys.setdefault(id(batch), []).append(key)
            batches[id(batch)] = batch
        cuda = self.device.type == "cuda"
        cache = HiddenCache(self._ram_cache_bytes(), self.spill_parent, pin=cuda)
        out: dict[int, Captured] = {}
        try:
            self._outer_to(self.device)  # embeddings and vision tower (off the GPU during a layer pass)
            started = time.perf_counter()
            for bid, batch in batches.items():
                if bid not in self._inputs_seen:
                    self._inputs_seen.add(bid)
                    self.input_bytes += _inputs_nbytes(batch)
                record = self.capture(batch)
                for key in keys[bid]:
                    cache.put(key, record.hidden)
                record.hidden = None
                out[bid] = record
            self._clock("capture", started)
            self._outer_to(torch.device("cpu"))
            if cuda:
                cache.promote(self._gpu_cache_bytes(), self.device)
        except BaseException:
            cache.close()
            raise
        return cache, out

    def _layers(self, on_layer: Callable[[int, int], None] | None) -> Iterator[int]:
        """Each decoder layer in turn, resident while the caller works on it; the next is prefetched."""
        n = len(self.layers)
        if self.prefetch:
            self.reader.prefetch(0)
        for i in range(n):
            started = time.perf_counter()
            self.reader.load(i)
            if self.prefetch and i + 1 < n:
                self.reader.prefetch(i + 1)
            self._clock("load", started)
            try:
                yield i
            finally:
                self.reader.release(i)
            if on_layer is not None:
                on_layer(i + 1, n)

    def _note_cache(self, cache: HiddenCache, captured) -> None:
        """The pass' cache budgets; its peaks, captured arguments and spilled writes: the largest over the
        passes (the greedy search's run after the statistics' pass)."""
        before = self.cache_peaks
        self.cache_peaks = {
            "gpu_cache_budget_gib": cache.gpu_limit,
            "gpu_cache_peak_gib": max(cache.peak_gpu_bytes, before.get("gpu_cache_peak_gib", 0)),
            "ram_cache_budget_gib": cache.limit,
            "ram_cache_peak_gib": max(cache.peak_ram_bytes, before.get("ram_cache_peak_gib", 0)),
            "captured_args_gib": max(_args_bytes(captured), before.get("captured_args_gib", 0)),
            "spilled_writes": cache.spilled_writes + before.get("spilled_writes", 0),
        }

    def run(self, streams: list[Stream], on_layer: Callable[[int, int], None] | None = None) -> HiddenCache:
        """Every stream's batches through every decoder layer, one layer resident (plus the prefetched
        next). Returns the cache holding each batch's last hidden state under (stream, batch), with the
        final norm and the LM head on the device; the caller closes it."""
        captured: dict[tuple[int, int], Captured] = {}
        cache = None
        try:
            with torch.inference_mode():
                keyed = [((s, b), batch) for s, stream in enumerate(streams) for b, batch in enumerate(stream.batches)]
                cache, by_batch = self._begin(keyed)
                for (s, b), batch in keyed:
                    captured[(s, b)] = by_batch[id(batch)]
                for i in self._layers(on_layer):
                    for s, stream in enumerate(streams):
                        started = time.perf_counter()
                        with stream.layer_context(i):
                            for b, batch in enumerate(stream.batches):
                                stream.before_batch(batch)
                                cache.put((s, b), self._through(i, captured[(s, b)], cache.get((s, b))))
                        self._clock("compute", started)
                self._outer_to(self.device, head_only=True)
                self._note_cache(cache, by_batch.values())
        except BaseException:
            if cache is not None:
                cache.close()
            raise
        self.last_cache = cache
        return cache

    def _through(self, i: int, record: Captured, hidden: torch.Tensor) -> torch.Tensor:
        """One batch through decoder layer i with the arguments the model gave it, then what the family
        does after that layer (recorded method calls)."""
        args, kwargs = _to(record.layer_args[i], self.device)
        hidden = self.layers[i](hidden.to(self.device, non_blocking=True), *args, **kwargs)
        for name, a, k in record.between.get(i, []):
            hidden = getattr(self.decoder, name)(hidden, *_to(a, self.device), **_to(k, self.device))
        return hidden

    def blocks_by_layer(self, blocks: list) -> dict[int, list]:
        """Decoder layer index -> the MoE blocks in it."""
        head = self.layers_path + "."
        by_layer: dict[int, list] = {}
        for b in blocks:
            if not b.block.startswith(head):
                raise BugError(f"MoE block {b.block} is outside the decoder layers {self.layers_path}")
            by_layer.setdefault(int(b.block[len(head) :].split(".", 1)[0]), []).append(b)
        return by_layer

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """What the model's forward does after the last layer: the final norm, then the LM head."""
        return self.model.get_output_embeddings()(self.decoder.norm(hidden.to(self.device)))

    def _rows(self, batch, reference: torch.Tensor, hidden: torch.Tensor | None) -> list[dict]:
        """candidates.sample_rows of one held-out batch from the last hidden states of the unpruned model
        (`reference`) and of a plan (`hidden`; None: the reference's own rows). sample_rows makes the logits
        with the final norm and the LM head a chunk of positions at a time, never [B, T, V] at once."""
        from ..candidates import sample_rows

        reference = reference.to(self.device)
        hidden = reference if hidden is None else hidden.to(self.device)
        return sample_rows(batch, reference, hidden, batch.inputs["input_ids"].to(self.device), self.logits)

    def run_plans(self, blocks: list, batches: list, plans: list[dict], *, usage: bool, progress=None, swaps=None):
        """candidates._run_plans for streamed execution. Plans the statistics' pass measured already
        (`score_pass` with a PlanSpace on the very same batches) are answered from it; the others (the greedy
        search's trial plans, its result) run in extra passes over the weights: the unpruned model and every
        plan side by side as streams of the batches, as many plans per pass as the hidden-state cache holds
        in RAM and on the GPU (`plans_per_pass`), so the streams do not spill. A plan's stream runs each
        layer with that layer's removed experts masked (masking.masked, as in memory); expert usage is the
        router-mode observer of the layer's blocks. At the end the final norm and the LM head give the
        logits that candidates._token_metrics compares, batch by batch. Same return value as _run_plans;
        `progress(done, total)` counts forwards of the whole model, as in memory. `swaps[i]` (a merge plan:
        plans.merge_key) is answered from the statistics' pass, which measured it (MergeSpace); only there."""
        measured = self.measured
        found: list = [None] * len(plans)
        same = measured is not None and len(measured.batches) == len(batches)
        if same and all(a is b for a, b in zip(measured.batches, batches, strict=True)):  # the very batches
            found = [measured.plans.get(_signature(blocks, plan)) for plan in plans]
        for pi, swap in enumerate(swaps or []):
            if swap is None:
                continue
            found[pi] = measured.merged.get((swap, _signature(blocks, plans[pi]))) if same else None
            if found[pi] is None:
                raise BugError(
                    "a merge plan reached the streamed plan measurement that the statistics' pass did not measure"
                )
        missing = [pi for pi, f in enumerate(found) if f is None]
        self.answered += len(plans) - len(missing)
        if not missing:
            return measured.baseline_rows, [f[0] for f in found], [measured.baseline_counts, *[f[1] for f in found]]
        per_pass = self.plans_per_pass(batches)
        forwards = len(batches) * (len(missing) + (len(missing) + per_pass - 1) // per_pass)
        done = 0
        baseline_rows = baseline_counts = None
        computed: dict[int, tuple[list[dict], dict]] = {}
        for start in range(0, len(missing), per_pass):
            chunk = missing[start : start + per_pass]
            report = None
            if progress:
                size = len(batches) * (len(chunk) + 1)

                def report(layers: int, total: int, done=done, size=size) -> None:
                    progress(done + size * layers // total, forwards)

            rows, plan_rows, counts = self._plan_pass(blocks, batches, [plans[pi] for pi in chunk], usage, report)
            done += len(batches) * (len(chunk) + 1)
            if baseline_rows is None:
                baseline_rows, baseline_counts = rows, counts[0]
            for k, pi in enumerate(chunk):
                computed[pi] = (plan_rows[k], counts[k + 1])
        if same:  # the statistics' pass measured the unpruned model on these batches: the same rows
            baseline_rows, baseline_counts = measured.baseline_rows, measured.baseline_counts
        answers = [found[pi] if found[pi] is not None else computed[pi] for pi in range(len(plans))]
        return baseline_rows, [a[0] for a in answers], [baseline_counts, *[a[1] for a in answers]]

    def plans_per_pass(self, batches: list) -> int:
        """How many plans one extra pass carries beside the unpruned model: as many as the hidden-state
        cache's RAM and GPU budgets hold streams of `batches` (each stream: one [B, T, H] state per batch in
        the compute dtype), at least one."""
        hidden = self.model.config.get_text_config().hidden_size
        item = torch.empty(0, dtype=self.dtype).element_size()
        stream = sum(b.inputs["input_ids"].numel() for b in batches) * hidden * item
        budget = self._ram_cache_bytes(quiet=True) + self._gpu_cache_bytes()
        return max(1, budget // max(stream, 1) - 1)

    def _plan_pass(self, blocks: list, batches: list, plans: list[dict], usage: bool, progress=None):
        """One pass over the weights: the unpruned model and every plan side by side (see run_plans)."""
        from ..masking import masked, removed_from_kept
        from ..observe.usage import ExpertUsage

        by_layer = self.blocks_by_layer(blocks)
        counts = [
            {b.key: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks} for _ in range(len(plans) + 1)
        ]
        current: list = []

        def context(pi: int):
            @contextlib.contextmanager
            def layer_context(i: int):
                mine = by_layer.get(i)
                if not mine:
                    yield
                    return
                with contextlib.ExitStack() as stack:
                    if pi >= 0:
                        stack.enter_context(masked(self.model, mine, removed_from_kept(mine, plans[pi])))
                    observing = stack.enter_context(ExpertUsage(self.model, mine)) if usage else None
                    current.append(observing)
                    try:
                        yield
                    finally:
                        current.pop()
                    if observing is not None:
                        for key, total in observing.totals().items():
                            counts[pi + 1][key] += total

            return layer_context

        def before_batch(batch) -> None:
            if current and current[-1] is not None:
                current[-1].batch(batch.modality)

        self.extra_passes += 1
        streams = [Stream(batches, context(pi), before_batch) for pi in range(-1, len(plans))]
        cache = self.run(streams, progress)
        baseline_rows: list[dict] = []
        per_plan_rows: list[list[dict]] = [[] for _ in plans]
        try:
            with torch.inference_mode():
                started = time.perf_counter()
                for b, batch in enumerate(batches):
                    # final hidden states; sample_rows makes the logits a chunk of positions at a time
                    reference = cache.get((0, b))
                    baseline_rows.extend(self._rows(batch, reference, None))
                    for pi in range(len(plans)):
                        per_plan_rows[pi].extend(self._rows(batch, reference, cache.get((pi + 1, b))))
                self._clock("head", started)
        finally:
            cache.close()
        return baseline_rows, per_plan_rows, counts

    def close(self) -> None:
        self.reader.close()


class MergedLayers:
    """The merge statistics of a streamed pass: each layer's MergeStats turned into tensors while its
    weights were resident (the mean gated output needs the down projections). Same `tensors()` as
    observe.merge_stats.MergeStats, so the same writer stores it."""

    def __init__(self, samples: int):
        self.samples = samples
        self._tensors: dict[str, torch.Tensor] = {}

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        self._tensors.update(tensors)

    def tensors(self) -> dict[str, torch.Tensor]:
        return dict(self._tensors)


def _signature(blocks: list, plan: dict[str, list[int]]) -> tuple:
    return tuple(tuple(plan[b.key]) for b in blocks)


@dataclass
class PlanSpace:
    """The candidate plans measured in the statistics' pass. `cut(stats)` gets one layer's statistics
    (block key -> what Observer.export() gives) as soon as that layer's calibration batches are through,
    and returns, per candidate, its kept experts of those blocks (None: the candidate cannot be cut and is
    not measured). A block's plan depends on that block's statistics only (scoring.select)."""

    batches: list
    count: int
    cut: Callable[[dict], list[dict[str, list[int]] | None]]


@dataclass
class MergeSpace:
    """The merge candidate measured in the statistics' pass (REAP_EVAL_MERGE). `cut(stats, tensors)` gets one
    layer's statistics (block key -> what Observer.export() gives) and merge statistics (block key -> name ->
    tensor) and returns (groups, saliency, activations, kept centroids) of those blocks, or None (the candidate
    cannot be made and is not measured); `key` identifies it (plans.merge_key)."""

    cut: Callable[[dict, dict], tuple | None]
    key: tuple
    router: str


@dataclass
class Measured:
    """What the statistics' pass measured on the held-out batches: the unpruned model's rows and usage,
    and per distinct plan (signature over the blocks) its rows and usage; `kept[c]`: candidate c's plan;
    `merged`: the merge candidate's rows and usage by (MergeSpace.key, signature of its kept centroids)."""

    batches: list
    baseline_rows: list[dict]
    baseline_counts: dict
    plans: dict[tuple, tuple[list[dict], dict]]
    kept: list[dict[str, list[int]] | None]
    merged: dict[tuple, tuple[list[dict], dict]] = field(default_factory=dict)


def score_pass(
    streamed: StreamedModel,
    blocks: list,
    batches: list,
    mode: str,
    budget_mb: int,
    on_layer=None,
    merge=None,
    seed: int = 0,
    plans: PlanSpace | None = None,
    merging: MergeSpace | None = None,
) -> tuple[dict, MergedLayers | None, Measured | None]:
    """The calibration statistics of every MoE block and, with `plans`, every candidate plan's held-out
    rows, in ONE pass over the weights. Per decoder layer:

    1. the calibration batches run through it under an Observer of the layer's MoE blocks (the class the
       in-memory path uses); the layer's statistics are then complete;
    2. with `plans`: every candidate's kept experts of this layer are cut from those statistics;
       candidates whose plans agree on every layer so far share one stream of held-out hidden states (a
       stream splits where they first differ), so each distinct plan prefix runs once;
    3. the unpruned stream and every plan stream run the held-out batches through the layer, each plan
       with its removed experts' router logits masked (masking.masked), under a router-mode observer of
       the layer's blocks (expert usage);
    4. with `merging` (and `merge`): the merge candidate's groups of this layer are made from the layer's
       statistics and merge statistics, its merged experts from the resident weights are written into their
       centroids' slots (methods.merge_memory.prepare, as in memory), and its own stream of held-out states
       runs through the layer with the other group members' router logits masked. It runs last: the layer's
       weights are released afterwards (read again from the shards by any later pass), so nothing is restored.

    After the last layer the final norm and the LM head give each stream's logits, and
    candidates.sample_rows the per-sample rows, batch by batch. Returns (stats as Observer.export(),
    merge statistics, the measurement, which StreamedModel.run_plans answers measure_plans from)."""
    from ..masking import masked, removed_from_kept
    from ..observe import Observer
    from ..observe.usage import ExpertUsage

    by_layer = streamed.blocks_by_layer(blocks)
    stats: dict = {}
    merged = MergedLayers(merge.samples) if merge is not None else None
    held = plans.batches if plans is not None else []
    alive = list(range(plans.count)) if plans is not None else []
    kept: list[dict | None] = [{} for _ in alive]
    counts: list[dict] = [{} for _ in alive]
    baseline_counts: dict = {}
    groups: dict[int, list[int]] = {0: list(alive)}  # stream -> its candidates; 0: the unpruned model
    layer_kept: dict[int, dict] = {0: {}}  # stream -> the kept experts of the current layer ({} = all)
    next_group = 1
    merge_kept: dict | None = {} if merging is not None and merge is not None and held else None
    merge_counts: dict = {}
    cache = None
    measured = None
    try:
        with torch.inference_mode():
            cache, captured = streamed._begin(
                [(("calibration", b), batch) for b, batch in enumerate(batches)]
                + [((0, b), batch) for b, batch in enumerate(held)]
                + [((MERGE_STREAM, b), batch) for b, batch in enumerate(held) if merge_kept is not None]
            )
            for i in streamed._layers(on_layer):
                mine = by_layer.get(i, [])
                started = time.perf_counter()
                observer = None
                if mine:
                    layer_merge = None
                    if merge is not None:
                        from ..observe.merge_stats import MergeStats

                        layer_merge = MergeStats(mine, merge.samples, merge.per_batch, seed)
                    observer = Observer(streamed.model, mine, mode, budget_mb, merge=layer_merge)
                with observer if observer is not None else contextlib.nullcontext():
                    for b, batch in enumerate(batches):
                        if observer is not None:
                            observer.set_modality(batch.modality)
                        key = ("calibration", b)
                        cache.put(key, streamed._through(i, captured[id(batch)], cache.get(key)))
                layer_tensors = None
                if observer is not None:
                    stats.update(observer.export())
                    if layer_merge is not None:
                        layer_tensors = layer_merge.tensors()
                        merged.add(layer_tensors)
                started = streamed._clock("compute", started)
                if not held:
                    continue
                if mine:  # cut this layer's plans; split the streams where their candidates' plans differ
                    cuts = plans.cut({b.key: stats[b.key] for b in mine})
                    for c in list(alive):
                        if cuts[c] is None:
                            alive.remove(c)
                            kept[c] = None
                        else:
                            kept[c].update(cuts[c])
                    for g, members in list(groups.items()):
                        parts: dict[tuple, list[int]] = {}
                        for c in members:
                            if kept[c] is None:
                                continue
                            every = all(len(cuts[c][b.key]) == b.num_experts for b in mine)
                            parts.setdefault(() if every else _signature(mine, cuts[c]), []).append(c)
                        groups[g] = []
                        for sig, part in parts.items():
                            target = g if (g != 0 or sig == ()) and not groups[g] else None
                            if target is None:  # a new stream, starting from this stream's states
                                target, next_group = next_group, next_group + 1
                                for b in range(len(held)):
                                    cache.put((target, b), cache.get((g, b)))
                            groups[target] = part
                            layer_kept[target] = {} if sig == () else cuts[part[0]]
                        if not groups[g] and g != 0:
                            del groups[g]
                            layer_kept.pop(g, None)
                            for b in range(len(held)):
                                cache.drop((g, b))
                for g in sorted(groups):
                    with contextlib.ExitStack() as stack:
                        usage = None
                        if mine:
                            if layer_kept.get(g):
                                stack.enter_context(
                                    masked(streamed.model, mine, removed_from_kept(mine, layer_kept[g]))
                                )
                            usage = stack.enter_context(ExpertUsage(streamed.model, mine))
                        for b, batch in enumerate(held):
                            if usage is not None:
                                usage.batch(batch.modality)
                            cache.put((g, b), streamed._through(i, captured[id(batch)], cache.get((g, b))))
                    if usage is not None:
                        totals = usage.totals()
                        for c in groups[g]:
                            counts[c].update(totals)
                        if g == 0:
                            baseline_counts.update(totals)
                started = streamed._clock("plans", started)
                if merge_kept is not None:  # its own phase: making the merged experts is most of it
                    merge_kept = _merge_stream(
                        streamed,
                        i,
                        mine,
                        merging,
                        stats,
                        layer_tensors,
                        held,
                        captured,
                        cache,
                        merge_kept,
                        merge_counts,
                    )
                    started = streamed._clock("merge", started)
            streamed._outer_to(streamed.device, head_only=True)
            if held:
                started = time.perf_counter()
                rows: dict[int, list[dict]] = {g: [] for g in groups}
                for b, batch in enumerate(held):
                    reference = cache.get((0, b))
                    for g in groups:
                        rows[g].extend(streamed._rows(batch, reference, None if g == 0 else cache.get((g, b))))
                streamed._clock("head", started)
                found: dict[tuple, tuple[list[dict], dict]] = {}
                for g, members in groups.items():
                    for c in members:
                        found.setdefault(_signature(blocks, kept[c]), (rows[g], counts[c]))
                zeros = {b.key: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
                measured = Measured(held, rows[0], {**zeros, **baseline_counts}, found, kept)
                if merge_kept is not None:
                    merge_rows: list[dict] = []
                    for b, batch in enumerate(held):
                        merge_rows.extend(streamed._rows(batch, cache.get((0, b)), cache.get((MERGE_STREAM, b))))
                    key = (merging.key, _signature(blocks, merge_kept))
                    measured.merged[key] = (merge_rows, {**zeros, **merge_counts})
            streamed._note_cache(cache, captured.values())
    finally:
        if cache is not None:
            cache.close()
    streamed.measured = measured
    if merged is not None:
        streamed.merge_bytes = sum(t.numel() * t.element_size() for t in merged.tensors().values())
    return {b.key: stats[b.key] for b in blocks}, merged, measured


MERGE_STREAM = "merge"  # the cache key of the merge candidate's held-out states


def _merge_stream(streamed, i, mine, merging, stats, tensors, held, captured, cache, kept, counts):
    """Step 4 of score_pass for decoder layer i. Returns the merge candidate's kept centroids so far, or None
    once it cannot be made (its states are dropped)."""
    from ..masking import masked, removed_from_kept
    from ..methods import merge_memory
    from ..observe import merge_stats
    from ..observe.usage import ExpertUsage

    if mine:
        cut = merging.cut({b.key: stats[b.key] for b in mine}, merge_stats.by_block(tensors or {}))
        if cut is None:
            for b in range(len(held)):
                cache.drop((MERGE_STREAM, b))
            return None
        groups, saliency, acts, layer_kept = cut
        kept.update(layer_kept)
        # computed on the device from the resident weights, as in memory; written into the centroids' slots
        updates = merge_memory.prepare(
            streamed.model, mine, groups, saliency, acts, router_mode=merging.router, device=streamed.device
        )
        for target, value in updates:
            target.copy_(value)
        del updates
    with contextlib.ExitStack() as stack:
        usage = None
        if mine:
            stack.enter_context(masked(streamed.model, mine, removed_from_kept(mine, layer_kept)))
            usage = stack.enter_context(ExpertUsage(streamed.model, mine))
        for b, batch in enumerate(held):
            if usage is not None:
                usage.batch(batch.modality)
            key = (MERGE_STREAM, b)
            cache.put(key, streamed._through(i, captured[id(batch)], cache.get(key)))
    if usage is not None:
        counts.update(usage.totals())
    return kept


def observe(
    streamed: StreamedModel,
    blocks: list,
    batches: list,
    mode: str,
    budget_mb: int,
    on_layer=None,
    merge=None,
    seed: int = 0,
) -> tuple[dict, MergedLayers | None]:
    """Calibration statistics of every MoE block, layer by layer (score_pass without plans). Returns
    (what Observer.export() returns for all blocks, merge statistics).

    `merge`: the in-memory path's MergeStats (sizes and seed); here each layer gets its own with the
    same sample budget, and its tensors are taken before the layer is released. The sums are the
    in-memory path's; the sampled tokens of the activations are a draw of the same size from a
    generator per layer (in memory one generator runs over all blocks batch by batch)."""
    stats, merged, _ = score_pass(streamed, blocks, batches, mode, budget_mb, on_layer, merge, seed)
    return stats, merged
