"""In-memory execution: the whole model is loaded (one device, or accelerate's device_map) and every
batch runs through the model's own forward."""

from __future__ import annotations

import functools
import inspect

import torch

from ..loading import input_device


def prepare_inputs(model: torch.nn.Module, batch, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The batch's model inputs on the input device, images in the model's dtype."""
    device = input_device(model) if device is None else device
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


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
