"""Load a model and its processor the way a user would: from a directory, with the right Auto class."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from . import console
from .checkpoint.layout import read_config
from .errors import CheckpointError, DeviceError, SettingsError, UnsupportedModelError

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def is_vision_language(config: dict) -> bool:
    architectures = config.get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in architectures):
        return False  # a text model whose config also describes a vision tower (Mistral 4)
    return "vision_config" in config or any(a.endswith("ForConditionalGeneration") for a in architectures)


CODE_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json")


def _auto_maps(model_dir: Path, config: dict) -> dict[str, dict]:
    """file name -> its `auto_map` (the custom classes transformers would import from the folder's .py files)."""
    found = {"config.json": config.get("auto_map")} if isinstance(config.get("auto_map"), dict) else {}
    for name in CODE_FILES[1:]:
        path = Path(model_dir) / name
        try:
            if path.is_file() and path.stat().st_size < 1 << 20:
                data = json.loads(path.read_text())
                if isinstance(data, dict) and isinstance(data.get("auto_map"), dict):
                    found[name] = data["auto_map"]
        except (OSError, ValueError):
            continue  # an unreadable file is the loader's to report
    return found


def remote_code(model_dir: Path, config: dict, trust: bool) -> str | None:
    """What custom code the checkpoint ships and what happens to it, as one line (None when there is none).

    transformers is always called with an explicit trust_remote_code, so it never prompts. Without trust, a
    model type that transformers has built in is loaded with the built-in classes (said here); any other
    model type is refused, naming REAP_TRUST_REMOTE_CODE."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    maps = _auto_maps(model_dir, config)
    if not maps:
        return None
    where = ", ".join(f"{name} ({', '.join(sorted(m))})" for name, m in maps.items())
    model_type = config.get("model_type")
    if trust:
        return f"the checkpoint's custom code runs (REAP_TRUST_REMOTE_CODE=true): auto_map in {where}"
    if "config.json" in maps and model_type not in CONFIG_MAPPING:
        raise UnsupportedModelError(
            f"{model_dir} needs its own modelling code (auto_map in {where})",
            f"model type {model_type!r} is not built into transformers, and REAP_TRUST_REMOTE_CODE is off",
            "Set REAP_TRUST_REMOTE_CODE=true (or --trust-remote-code) only if you have read and trust the .py "
            "files in that folder",
        )
    return (
        f"auto_map in {where} names custom code that is not run: transformers' built-in classes for "
        f"{model_type!r} are used (REAP_TRUST_REMOTE_CODE=true would run the checkpoint's code instead)"
    )


def resolve_device(device: str) -> str:
    """'auto' -> 'auto' when CUDA is present (accelerate device_map), else 'cpu'. Validates cuda requests."""
    if device == "auto":
        return "auto" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"REAP_DEVICE={device} but no CUDA GPU is visible",
                "torch.cuda.is_available() is False",
                "Use REAP_DEVICE=cpu or auto, or run in the GPU container (./run.sh with docker)",
            )
        index = int(device.split(":")[1]) if ":" in device else 0
        if index >= torch.cuda.device_count():
            raise DeviceError(
                f"REAP_DEVICE={device} does not exist",
                f"{torch.cuda.device_count()} GPU(s) visible",
                "Pick an index below that count",
            )
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype | str:
    if dtype == "auto":
        # The checkpoint's own dtype on GPU; fp32 on CPU, where bf16 matmuls are slow and fp16 unsupported.
        return "auto" if device != "cpu" else torch.float32
    if device == "cpu" and dtype == "float16":
        raise DeviceError(
            "REAP_DTYPE=float16 is not supported on the CPU",
            "half-precision matmuls need a GPU",
            "Use bfloat16 or float32 on the CPU",
        )
    return DTYPES[dtype]


def load_model(
    model_dir: Path,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "",
    experts_implementation: str | None = None,
    keep_fp8_experts: bool | None = None,
    offload: tuple[dict, Path] | None = None,
    keep_packed_experts: bool | None = None,
):
    """(model, processor, config dict). The model is in eval mode; the processor is the checkpoint's own
    (a tokenizer for text-only models).

    keep_fp8_experts: an FP8 block-wise checkpoint's routed experts stay e4m3 in memory (transformers'
    FP8Experts, see reap_vlm.quantization); None: on a GPU (on a CPU transformers dequantizes anyway).
    keep_packed_experts: a compressed-tensors, AWQ or GPTQ checkpoint's routed experts, stored one by one,
    stay as stored in memory (quantization.PackedExperts) and are dequantized a chunk of experts at a time
    when used; None: on a GPU, as for FP8. Otherwise every weight is dequantized at load.
    offload: (max_memory, folder) for accelerate's device_map="auto", what does not fit max_memory
    offloaded to that folder on disk."""
    from huggingface_hub.errors import StrictDataclassError  # transformers' typed config fields
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = read_config(model_dir)
    note = remote_code(model_dir, config, trust_remote_code)
    if note:
        console.info(f"note: {note}")
    device = resolve_device(device)
    quant = quantization_of(model_dir, config)
    on_gpu = device != "cpu" and torch.cuda.is_available() and offload is None
    keep_fp8_experts = on_gpu if keep_fp8_experts is None else keep_fp8_experts
    keep_packed_experts = on_gpu if keep_packed_experts is None else keep_packed_experts
    if quant is None or quant.format == "fp8":
        keep_packed_experts = False
    if quant is not None and keep_fp8_experts:
        from .checkpoint.layout import inspect_checkpoint
        from .quantization import fp8_experts_keepable

        keep_fp8_experts = fp8_experts_keepable(quant, inspect_checkpoint(model_dir))
    if quant is not None and (keep_fp8_experts or not _transformers_reads(quant, model_dir, config)):
        if offload is not None:
            raise SettingsError(
                f"REAP_GENERATION=offload cannot offload this {quant.format} checkpoint",
                "it is dequantized by this tool while loading, which accelerate's offload does not do",
                "Use REAP_GENERATION=skip (the verdict is then teacher-forced) or memory",
            )
        model = _load_dequantizing(
            model_dir,
            config,
            device,
            dtype,
            trust_remote_code,
            attn_implementation,
            keep_fp8_experts,
            keep_packed_experts,
        )
        return model, load_processor(model_dir, trust_remote_code), config
    kwargs: dict = {"dtype": resolve_dtype(dtype, device), "trust_remote_code": trust_remote_code}
    if quant is not None:  # transformers' fine-grained FP8 loader, dequantizing on load (as it does on a CPU)
        from transformers import FineGrainedFP8Config

        qc = config.get("quantization_config") or {}
        kwargs["quantization_config"] = FineGrainedFP8Config(
            weight_block_size=qc.get("weight_block_size"),
            modules_to_not_convert=qc.get("modules_to_not_convert"),
            dequantize=True,
        )
    kwargs["device_map"] = device
    if offload is not None:
        kwargs["device_map"] = "auto"
        kwargs["max_memory"], kwargs["offload_folder"] = offload[0], str(offload[1])
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    try:
        model = auto.from_pretrained(str(model_dir), **kwargs)
    except (ValueError, ImportError) as err:
        first = (str(err).splitlines() or [type(err).__name__])[0]
        if not attn_implementation or ("attn_implementation" not in first and not isinstance(err, ImportError)):
            raise _load_error(model_dir, first) from None
        raise SettingsError(
            f"REAP_ATTN_IMPLEMENTATION={attn_implementation!r} cannot be used with this model",
            first.split(". ")[0][:200],
            "Use sdpa or eager, or leave REAP_ATTN_IMPLEMENTATION empty for the model's default",
        ) from None
    except (OSError, KeyError, RuntimeError, TypeError, AttributeError, IndexError, StrictDataclassError) as err:
        # what transformers says about a config.json its model class cannot be built from, or weights
        # whose sizes do not fit it (RuntimeError: size mismatch); out of memory is not the checkpoint's fault
        if isinstance(err, torch.OutOfMemoryError):
            raise
        raise _load_error(model_dir, f"{type(err).__name__}: " + (str(err).splitlines() or [""])[0][:200]) from None
    model.eval()
    return model, load_processor(model_dir, trust_remote_code), config


def quantization_of(model_dir: Path, config: dict):
    """reap_vlm.quantization.detect on the checkpoint's config and safetensors headers (None: plain)."""
    from .checkpoint.layout import inspect_checkpoint
    from .quantization import detect

    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    if not qc and not _has_quantized_names(model_dir):
        return None
    return detect(config, inspect_checkpoint(model_dir))


def _transformers_reads(quant, model_dir: Path, config: dict) -> bool:
    """Whether transformers' own loader reads this quantized checkpoint here: fine-grained FP8 declared in
    config.json, in names its conversions know (not per-expert tensors of a type it reads fused only)."""
    from .checkpoint.layout import inspect_checkpoint
    from .execution.weights import PER_EXPERT_CONVERSIONS

    if quant.format != "fp8" or quant.source != "config.json":
        return False
    if config.get("model_type") in PER_EXPERT_CONVERSIONS:
        return not any(".experts.0." in n for n in inspect_checkpoint(model_dir).tensors)
    return True


def _has_quantized_names(model_dir: Path) -> bool:
    """An export without quantization_config whose tensor names are quantized ones (transformers would load it
    with random weights). A checkpoint the layout reader refuses is left to the loader to report."""
    from .checkpoint.layout import inspect_checkpoint
    from .errors import ReapError
    from .quantization import _modules_from_names

    try:
        names = inspect_checkpoint(model_dir).tensors
    except (ReapError, OSError, ValueError):
        return False
    return bool(_modules_from_names(names, {})[1])


def _load_dequantizing(
    model_dir: Path,
    config: dict,
    device: str,
    dtype: str,
    trust: bool,
    attn: str,
    keep_fp8_experts: bool = False,
    keep_packed_experts: bool = False,
):
    """A quantized checkpoint transformers cannot load on this machine (compressed-tensors, AWQ and GPTQ
    want GPU kernels; an export without quantization_config would be loaded with random weights): the
    model is built on the meta device and every tensor is read and dequantized by the streamed path's
    layer reader (execution.weights), all layers kept. One device: the first GPU under `auto`.

    keep_fp8_experts: the routed experts become transformers' FP8Experts holding the checkpoint's e4m3
    weights and block scales (quantization.keep_fp8_experts); their forward is transformers' FP8 kernel
    where it loads, else the chunk-by-chunk dequantizing one (quantization.dequantized_experts_forward).
    keep_packed_experts: the routed experts stay as stored in quantization.PackedExperts (the reader
    replaces the modules that fit); their forward is the chunk-by-chunk dequantizing one."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    from .execution.stream import resolve_dtype as stream_dtype
    from .execution.weights import OUTER, LayerReader

    target = torch.device("cuda:0" if device == "auto" else ("cuda:0" if device == "cuda" else device))
    compute = stream_dtype(dtype, target, config)
    hf_config = AutoConfig.from_pretrained(str(model_dir), trust_remote_code=trust)
    auto = AutoModelForImageTextToText if is_vision_language(config) else AutoModelForCausalLM
    kwargs: dict = {"dtype": compute, "trust_remote_code": trust}
    if attn:
        kwargs["attn_implementation"] = attn
    with init_empty_weights(include_buffers=False):
        model = auto.from_config(hf_config, **kwargs)
    swapped = []
    if keep_fp8_experts:
        from .quantization import keep_fp8_experts as swap

        swapped = swap(model, quantization_of(model_dir, config).block_size, compute)
    reader = LayerReader(
        model_dir,
        model,
        device=target,
        dtype=compute,
        keep_fp8_experts=bool(swapped),
        keep_packed_experts=keep_packed_experts and not swapped,
    )
    try:
        for group in [OUTER, *range(len(reader.layers))]:
            reader.load(group)
    finally:
        reader.close()
    if swapped:
        from .quantization import FP8_DEQUANTIZED_IMPL, fp8_kernels_load

        kernels = fp8_kernels_load(target)
        for name in swapped:
            experts = model.get_submodule(name)
            if not kernels or experts.config._experts_implementation not in ("eager", "grouped_mm", "batched_mm"):
                experts.config._experts_implementation = FP8_DEQUANTIZED_IMPL
        impl = "transformers' FP8 kernels" if kernels else "dequantizing chunk by chunk (no FP8 kernels load)"
        console.info(f"note: the routed experts stay FP8 in memory ({len(swapped)} layers); their forward: {impl}")
    if reader.packed_modules:
        from .quantization import PACKED_DEQUANTIZED_IMPL

        for name in reader.packed_modules:
            model.get_submodule(name).config._experts_implementation = PACKED_DEQUANTIZED_IMPL
        console.info(
            f"note: the routed experts stay {reader.quantization.format} ({reader.quantization.scheme}) in memory "
            f"({len(reader.packed_modules)} layers), dequantized chunk by chunk where used"
        )
    model.eval()
    return model


def load_processor(model_dir: Path, trust_remote_code: bool = False):
    """The checkpoint's own processor (a tokenizer for text-only models)."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError):
        try:
            return AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        except (OSError, ValueError, TypeError) as err:  # no tokenizer files, or one that needs custom code
            raise CheckpointError(
                f"transformers could not load a processor or tokenizer from {model_dir}",
                (str(err).splitlines() or [type(err).__name__])[0][:300],
                "Check the tokenizer files (tokenizer.json, tokenizer_config.json); custom tokenizer code needs "
                "REAP_TRUST_REMOTE_CODE=true",
            ) from None


def _load_error(model_dir: Path, first: str) -> CheckpointError:
    return CheckpointError(
        f"transformers could not load {model_dir}",
        first,
        "Check that the folder is a complete checkpoint (./run.sh verify shows its layout)",
    )


def input_device(model: torch.nn.Module) -> torch.device:
    """Where the inputs go: the embedding's device (first GPU under a device_map; for an embedding that
    accelerate offloaded, the device its hook computes on)."""
    embedding = model.get_input_embeddings()
    if embedding.weight.device.type == "meta":
        hook = getattr(embedding, "_hf_hook", None)
        device = getattr(hook, "execution_device", None)
        if device is not None:
            return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    return embedding.weight.device
