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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import BugError, UnsupportedModelError
from ..quantization import FORMATS as QUANT_METHODS
from .memory import prepare_inputs
from .weights import OUTER, LayerReader, decoder_layers, text_decoder


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
    """Hidden states per key: in RAM (CPU) while they fit `limit_bytes`, then files in a spill folder
    created under `spill_parent` and removed by close()."""

    def __init__(self, limit_bytes: int, spill_parent: Path | None = None, pin: bool = False):
        self.limit, self.spill_parent, self.pin = limit_bytes, spill_parent, pin
        self._ram: dict = {}
        self._files: dict = {}
        self.ram_bytes = self.peak_ram_bytes = 0
        self.spilled_writes = 0
        self._dir: Path | None = None

    def put(self, key, tensor: torch.Tensor) -> None:
        self._drop(key)
        size = tensor.numel() * tensor.element_size()
        if self.ram_bytes + size <= self.limit:
            value = tensor.to("cpu", copy=tensor.device.type == "cpu")
            self._ram[key] = value.pin_memory() if self.pin else value
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
        if key in self._ram:
            return self._ram[key]
        return torch.load(self._files[key], weights_only=True)

    def _drop(self, key) -> None:
        old = self._ram.pop(key, None)
        if old is not None:
            self.ram_bytes -= old.numel() * old.element_size()
        path = self._files.pop(key, None)
        if path is not None:
            path.unlink(missing_ok=True)

    @property
    def spill_dir(self) -> Path | None:
        return self._dir

    def close(self) -> None:
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


def _to(obj, device: torch.device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


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
        self.reader = LayerReader(model_dir, self.model, device=self.device, dtype=self.dtype)
        self.reader.load(OUTER)
        self.last_cache: HiddenCache | None = None

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
        return _to(record, torch.device("cpu")) if self.device.type != "cpu" else record

    # ---- the pass over the layers ------------------------------------------------------------
    def run(self, streams: list[Stream], on_layer: Callable[[int, int], None] | None = None) -> HiddenCache:
        """Every stream's batches through every decoder layer, one layer resident (plus the prefetched
        next). Returns the cache holding each batch's last hidden state under (stream, batch);
        the caller closes it."""
        cache = HiddenCache(self.cache_bytes, self.spill_parent, pin=self.device.type == "cuda")
        captured: dict[tuple[int, int], Captured] = {}
        try:
            with torch.inference_mode():
                by_batch: dict[int, Captured] = {}  # streams of the same batches (plans) share one capture
                for s, stream in enumerate(streams):
                    for b, batch in enumerate(stream.batches):
                        record = by_batch.get(id(batch))
                        if record is None:
                            record = by_batch[id(batch)] = self.capture(batch)
                        cache.put((s, b), record.hidden)
                        captured[(s, b)] = record
                for record in by_batch.values():
                    record.hidden = None
                n = len(self.layers)
                if self.prefetch:
                    self.reader.prefetch(0)
                for i in range(n):
                    self.reader.load(i)
                    if self.prefetch and i + 1 < n:
                        self.reader.prefetch(i + 1)
                    for s, stream in enumerate(streams):
                        with stream.layer_context(i):
                            for b, batch in enumerate(stream.batches):
                                stream.before_batch(batch)
                                cache.put((s, b), self._through(i, captured[(s, b)], cache.get((s, b))))
                    self.reader.release(i)
                    if on_layer is not None:
                        on_layer(i + 1, n)
        except BaseException:
            cache.close()
            raise
        self.last_cache = cache
        return cache

    def _through(self, i: int, record: Captured, hidden: torch.Tensor) -> torch.Tensor:
        """One batch through decoder layer i with the arguments the model gave it, then what the family
        does after that layer (recorded method calls)."""
        args, kwargs = _to(record.layer_args[i], self.device)
        hidden = self.layers[i](hidden.to(self.device), *args, **kwargs)
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

    def run_plans(self, blocks: list, batches: list, plans: list[dict], *, usage: bool, progress=None):
        """candidates._run_plans in one pass over the weights: the unpruned model and every plan side by
        side as streams of the held-out batches. A plan's stream runs each layer with that layer's removed
        experts masked (masking.masked, as in memory); expert usage is the router-mode observer of the
        layer's blocks. At the end the final norm and the LM head give the logits (a chunk at a time) that
        candidates._token_metrics compares, batch by batch. Same return value as _run_plans."""
        from ..candidates import sample_rows
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

        streams = [Stream(batches, context(pi), before_batch) for pi in range(-1, len(plans))]
        cache = self.run(streams, (lambda done, total: progress(done, total)) if progress else None)
        baseline_rows: list[dict] = []
        per_plan_rows: list[list[dict]] = [[] for _ in plans]
        try:
            with torch.inference_mode():
                for b, batch in enumerate(batches):
                    # final hidden states; sample_rows makes the logits a chunk of positions at a time
                    reference = cache.get((0, b))
                    input_ids = batch.inputs["input_ids"].to(self.device)
                    for pi in range(-1, len(plans)):
                        hidden = reference if pi == -1 else cache.get((pi + 1, b))
                        rows = baseline_rows if pi == -1 else per_plan_rows[pi]
                        rows.extend(sample_rows(batch, reference, hidden, input_ids, self.logits))
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
    """Calibration statistics of every MoE block, layer by layer: per decoder layer an Observer of
    that layer's blocks (reap_vlm.observe.Observer, as in memory) is active while the cached batches
    run through it. Returns (what Observer.export() returns for all blocks, merge statistics).

    `merge`: the in-memory path's MergeStats (sizes and seed); here each layer gets its own with the
    same sample budget, and its tensors are taken before the layer is released. The sums are the
    in-memory path's; the sampled tokens of the activations are a draw of the same size from a
    generator per layer (in memory one generator runs over all blocks batch by batch)."""
    from ..observe import Observer

    by_layer = streamed.blocks_by_layer(blocks)
    stats: dict = {}
    active: list = []
    merged = MergedLayers(merge.samples) if merge is not None else None

    @contextlib.contextmanager
    def layer_context(i: int):
        if i not in by_layer:
            yield
            return
        layer_merge = None
        if merge is not None:
            from ..observe.merge_stats import MergeStats

            layer_merge = MergeStats(by_layer[i], merge.samples, merge.per_batch, seed + i)
        observer = Observer(streamed.model, by_layer[i], mode, budget_mb, merge=layer_merge)
        active.append(observer)
        with observer:
            yield
        stats.update(observer.export())
        if layer_merge is not None:
            merged.add(layer_merge.tensors())
        active.pop()

    def before_batch(batch) -> None:
        if active:
            active[-1].set_modality(batch.modality)

    cache = streamed.run([Stream(batches, layer_context, before_batch)], on_layer)
    cache.close()
    return {b.key: stats[b.key] for b in blocks}, merged
