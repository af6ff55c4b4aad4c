"""In-memory execution: the whole model is loaded (one device, or accelerate's device_map) and every
batch runs through the model's own forward."""

from __future__ import annotations

import functools
import inspect

import torch

from ..loading import input_device


def prepare_inputs(model: torch.nn.Module, batch, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The batch's model inputs on the input device, images in the model's dtype. Host tensors go to a GPU
    from pinned memory without waiting for it (prepare_batches pins them once; a plain `.to("cuda")` of
    pageable memory synchronises the stream). The vision tower's precomputed inputs (precompute_vision)
    come as they are; the grid sizes of their modality stay on the host, where nothing reads them but a
    `.tolist()` (see precompute_vision)."""
    from ..observe.stats import to_device
    from .vision import remember_bounds

    device = input_device(model) if device is None else device
    inputs = {}
    for k, v in batch.inputs.items():
        host = k in HOST_GRIDS and k.replace("grid_thw", "position_ids") in batch.inputs
        if host or not isinstance(v, torch.Tensor):
            inputs[k] = v
        else:
            inputs[k] = to_device(v, device)
            if k.endswith("_cu_seqlens"):  # the grouped vision attention reads the boundaries from the host copy
                remember_bounds(inputs[k], v)
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def prepare_batches(model: torch.nn.Module, batches) -> dict[str, int]:
    """What the data phase does once for in-memory execution, instead of in every forward: the multimodal
    RoPE position ids (precompute_positions), the vision tower's inputs (precompute_vision) and, for a
    model on a GPU, every batch tensor in pinned memory (copied without a stream sync). The forwards are
    unchanged bit for bit (tests/test_scoring.py). Returns how many batches got each."""
    batches = list(batches)
    done = {"position_ids": precompute_positions(model, batches), "vision": precompute_vision(model, batches)}
    pinned = 0
    if input_device(model).type == "cuda":
        for batch in batches:
            batch.inputs = {k: v.pin_memory() if isinstance(v, torch.Tensor) else v for k, v in batch.inputs.items()}
            batch.modality = batch.modality.pin_memory()
            pinned += 1
    done["pinned"] = pinned
    return done


def _rope_owner(model: torch.nn.Module):
    """The submodule whose forward computes multimodal RoPE position ids when none are passed (Qwen2/2.5/3-VL,
    GLM-4V, Ernie-4.5-VL, ...: `compute_3d_position_ids`), or None."""
    for module in model.modules():
        if callable(getattr(module, "compute_3d_position_ids", None)) and hasattr(module, "rope_deltas"):
            return module
    return None


def precompute_positions(model: torch.nn.Module, batches) -> int:
    """Multimodal RoPE position ids of the batches that hold images or videos, computed once on the host by the
    model's own `compute_3d_position_ids` and passed with the batch from then on (batch.inputs["position_ids"]).

    Inside the forward that function walks the batch row by row with host syncs on the GPU tensors
    (`.tolist()`, boolean masks, `.item()` per image): for a batch of ~100 short image questions, hundreds of
    syncs in every forward, scoring and every plan measured. The ids are integers and the same function makes
    them, so the forward is unchanged (tests/test_scoring.py checks the logits bit for bit). The model's
    `rope_deltas` (kept for generation) is left as it was. Returns how many batches got them."""
    owner = _rope_owner(model)
    if owner is None:
        return 0
    done, saved = 0, owner.rope_deltas
    try:
        for batch in batches:
            inputs = batch.inputs
            grids = {k: inputs.get(k) for k in ("image_grid_thw", "video_grid_thw")}
            if "position_ids" in inputs or "input_ids" not in inputs or all(g is None for g in grids.values()):
                continue
            positions = owner.compute_3d_position_ids(
                input_ids=inputs["input_ids"],
                inputs_embeds=None,
                attention_mask=inputs.get("attention_mask"),
                past_key_values=None,
                mm_token_type_ids=inputs.get("mm_token_type_ids"),
                **grids,
            )
            if positions is not None:
                inputs["position_ids"] = positions
                done += 1
    finally:
        owner.rope_deltas = saved
    return done


# Vision towers whose forward takes its position ids, interpolation taps, attention boundaries and longest
# image precomputed (transformers' vision_utils helpers pop them from the kwargs; get_image_features /
# get_video_features strip the `image_` / `video_` prefix), with how to make them from the grid sizes.
VISION_TOWERS_PRECOMPUTED = ("Qwen3VLVisionModel", "Qwen3VLMoeVisionModel")
HOST_GRIDS = ("image_grid_thw", "video_grid_thw")


def _vision_tower(model: torch.nn.Module):
    for module in model.modules():
        if type(module).__name__ in VISION_TOWERS_PRECOMPUTED:
            return module
    return None


def precompute_vision(model: torch.nn.Module, batches) -> int:
    """The vision tower's grid-dependent inputs of each batch with images or videos, made once on the host by
    transformers' own functions (vision_utils: the ones the tower calls when they are not passed) and passed
    with the batch as `image_position_ids`, `image_interp_indices`, `image_interp_weights`,
    `image_cu_seqlens` and `image_max_seqlen` (`video_*` for videos).

    Inside the forward these walk the images in a Python loop (the rotary position ids: an arange, meshgrid
    and cat per image) and synchronise with the GPU (`.tolist()`, `repeat_interleave` without a size, the
    longest image's `.item()` in each of the 27 blocks with the grouped attention): for a batch of ~100 images,
    hundreds of small ops and a dozen syncs, in every scoring forward and every plan measured. They are
    integers and elementwise float32 arithmetic, the same on the host as on the GPU, so the forward is
    unchanged bit for bit (tests/test_scoring.py). Only for the towers in VISION_TOWERS_PRECOMPUTED, and only
    for batches that also got their M-RoPE position ids (then nothing on the device reads the grid sizes:
    prepare_inputs leaves them on the host). Returns how many batches got them."""
    tower = _vision_tower(model)
    if tower is None:
        return 0
    from transformers import vision_utils

    done = 0
    for batch in batches:
        inputs, added = batch.inputs, False
        if "position_ids" not in inputs:
            continue
        for prefix in ("image", "video"):
            grid = inputs.get(f"{prefix}_grid_thw")
            if grid is None or f"{prefix}_position_ids" in inputs:
                continue
            grid = grid.cpu()
            indices, weights = vision_utils.get_vision_interpolation_indices_and_weights(
                grid,
                num_grid_per_side=tower.num_grid_per_side,
                mode=tower.interpolation_mode,
                align_corners=tower.interpolation_align_corners,
                spatial_merge_size=tower.config.spatial_merge_size,
            )
            cu_seqlens = vision_utils.get_vision_cu_seqlens(grid)
            inputs[f"{prefix}_interp_indices"], inputs[f"{prefix}_interp_weights"] = indices, weights
            inputs[f"{prefix}_position_ids"] = vision_utils.get_vision_position_ids(grid, tower.spatial_merge_size)
            inputs[f"{prefix}_cu_seqlens"] = cu_seqlens
            inputs[f"{prefix}_max_seqlen"] = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
            added = True
        done += added
    return done


def _keeps_logits(model: torch.nn.Module) -> bool:
    """Does the model's forward take `logits_to_keep` (transformers' causal LMs: the LM head runs only on
    the last positions)?"""
    return _class_keeps_logits(type(model))


@functools.cache
def _class_keeps_logits(cls: type) -> bool:  # the signature is the class's: read it once, not per batch
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def forward(model: torch.nn.Module, batch, device: torch.device | None = None):
    """One batch through the whole model (no KV cache); the model's output. Scoring needs no logits, so
    where the model allows it the LM head runs on the last position only (for a 150k vocabulary that is
    about a tenth of a 30B-A3B forward's time, and a [B, T, V] tensor). `device`: the input device, when
    the caller knows it (input_device walks the model)."""
    extra = {"logits_to_keep": 1} if _keeps_logits(model) else {}
    return model(**prepare_inputs(model, batch, device), use_cache=False, **extra)


class Headless:
    """The model's forward up to its final hidden states, and the LM head to make logits from them, so
    that the plan measurement never holds a [B, T, V] tensor (candidates._token_metrics makes the logits
    a chunk of positions at a time).

    `run(inputs)` returns (final hidden states [B, T, H], head) or, for a model where that is not exact,
    (logits, None). Exact means: the model's own logits of the last position (logits_to_keep=1) equal the
    head applied to the captured hidden state of that position, bit for bit — checked on the first call;
    a model that scales or caps its logits after the head fails the check and gets its full logits."""

    def __init__(self, model: torch.nn.Module):
        from ..errors import BugError
        from .weights import text_decoder

        self.model = model
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        try:
            self.decoder = text_decoder(model)
        except BugError:  # no recognisable decoder: full logits
            self.decoder = None
        self.exact: bool | None = (
            None if (self.head is not None and self.decoder is not None and _keeps_logits(model)) else False
        )

    def _full(self, inputs: dict):
        return self.model(**inputs, use_cache=False).logits, None

    def run(self, inputs: dict) -> tuple[torch.Tensor, torch.nn.Module | None]:
        if self.exact is False:
            return self._full(inputs)
        captured: list[torch.Tensor] = []

        def hook(_module, _args, output):
            hidden = output[0] if isinstance(output, tuple | list) or hasattr(output, "to_tuple") else output
            captured.append(hidden)

        handle = self.decoder.register_forward_hook(hook)
        try:
            logits = self.model(**inputs, use_cache=False, logits_to_keep=1).logits
        finally:
            handle.remove()
        ids = inputs["input_ids"]
        if len(captured) != 1 or captured[0].shape[:2] != ids.shape[:2]:
            self.exact = False
        elif self.exact is None:
            self.exact = bool(torch.equal(self.head(captured[0][:, -1:]), logits))
        if not self.exact:
            return self._full(inputs)
        return captured[0], self.head
