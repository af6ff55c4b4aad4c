"""Tiny checkpoints: several shards + index, offline processor, real classes, non-trivial routing."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from reap_vlm.loading import load_model
from reap_vlm.moe import find_moe_blocks


def _routing(model, inputs):
    picked = []
    hooks = [
        model.get_submodule(b.experts).register_forward_pre_hook(
            lambda _m, args: picked.append(args[1].flatten().clone())
        )
        for b in find_moe_blocks(model)
    ]
    with torch.inference_mode():
        out = model(**inputs)
    for h in hooks:
        h.remove()
    return out, picked


def test_vl_checkpoint_is_sharded_and_loads_offline(tiny_vl_dir):
    index = json.loads((tiny_vl_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 3 and all((tiny_vl_dir / s).is_file() for s in shards)
    assert any(k.startswith("model.visual.") for k in index["weight_map"])
    model, processor, config = load_model(tiny_vl_dir, device="cpu", dtype="float32")
    assert type(model).__name__ == "Qwen3VLMoeForConditionalGeneration"
    assert type(processor).__name__ == "Qwen3VLProcessor"
    assert config["model_type"] == "qwen3_vl_moe"


def test_vl_forward_with_image_and_routing_differs_by_input(tiny_vl_dir):
    model, processor, _ = load_model(tiny_vl_dir, device="cpu", dtype="float32")
    image = Image.fromarray((np.random.RandomState(0).rand(64, 96, 3) * 255).astype("uint8"))
    messages = [
        {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What is it?"}]}
    ]
    text = processor.apply_chat_template(messages, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    assert int(inputs["mm_token_type_ids"].sum()) == int(inputs["image_grid_thw"].prod() // 4)
    out, picked = _routing(model, inputs)
    assert torch.isfinite(out.logits).all()
    # experts differ and are used unevenly but broadly: more than top_k experts get tokens in every layer
    for layer in picked:
        assert len(torch.unique(layer)) > 4
    # different tokens pick different top-k pairs
    for layer in picked:
        pairs = {tuple(sorted(p)) for p in layer.view(-1, 2).tolist()}
        assert len(pairs) > 3
    # and a different input uses the experts differently
    other = processor(text=["def f(x):\n    return x * 2 + 1"], return_tensors="pt")
    _, picked_other = _routing(model, other)
    histograms = [
        (torch.bincount(a, minlength=8), torch.bincount(b, minlength=8))
        for a, b in zip(picked, picked_other, strict=True)
    ]
    assert any(not torch.equal(a / a.sum(), b / b.sum()) for a, b in histograms)


def test_text_checkpoint_round_trip(tiny_text_dir):
    from reap_vlm.tiny import build

    model, tokenizer, _ = load_model(tiny_text_dir, device="cpu", dtype="float32")
    fresh, _ = build("qwen3_moe", seed=0)
    ids = tokenizer("The quick brown fox", return_tensors="pt")
    with torch.inference_mode():
        assert torch.equal(model(**ids).logits, fresh(**ids).logits)  # save -> from_pretrained is lossless
    assert len(find_moe_blocks(model)) == 4


def test_unknown_family():
    from reap_vlm.errors import SettingsError
    from reap_vlm.tiny import build

    with pytest.raises(SettingsError, match="unknown tiny family"):
        build("not_a_family")
