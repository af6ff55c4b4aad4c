"""In-memory execution: the whole model is loaded (one device, or accelerate's device_map) and every
batch runs through the model's own forward."""

from __future__ import annotations

import torch

from ..loading import input_device


def prepare_inputs(model: torch.nn.Module, batch, device: torch.device | None = None) -> dict[str, torch.Tensor]:
    """The batch's model inputs on the input device, images in the model's dtype."""
    device = input_device(model) if device is None else device
    inputs = {k: v.to(device) for k, v in batch.inputs.items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def forward(model: torch.nn.Module, batch):
    """One batch through the whole model (no KV cache); the model's output."""
    return model(**prepare_inputs(model, batch), use_cache=False)
