"""The shipped demo VLM (reap_vlm/demo_vlm/): its structure, and that it still knows its tasks.

A regression test of the checkpoint itself: it loads through the real Auto classes, has the shape the
model card promises, and re-measures a slice of the held-out data the way the pipeline scores it: every
image task's exact match well above chance, text perplexity far below the unigram baseline (which the
card gives as 480 … 1,040 per domain)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from reap_vlm.calibration import TEXT_SETS, make_batches, read_source
from reap_vlm.candidates import _token_metrics
from reap_vlm.evaluate import generate
from reap_vlm.settings import TestSettings

DEMO = Path(__file__).resolve().parents[1] / "reap_vlm" / "demo_vlm"
TASKS = {"digit", "count", "shape", "position", "bar_max", "bar_count", "photo"}
PER_TASK = 12  # held-out questions re-asked per task
MARGIN = 0.3  # accuracy must beat the best constant answer's by this much


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(DEMO)
    model = AutoModelForImageTextToText.from_pretrained(DEMO, dtype=torch.float32).eval()
    return model, processor


def test_checkpoint_structure(demo):
    model, processor = demo
    index = json.loads((DEMO / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all((DEMO / s).is_file() for s in shards)
    assert sum(p.stat().st_size for p in DEMO.iterdir()) <= 12_000_000
    for shard in shards:
        with safe_open(DEMO / shard, "pt") as fh:
            assert {fh.get_slice(k).get_dtype() for k in fh.keys()} == {"BF16"}
    assert set(index["weight_map"]) == set(model.state_dict())  # nothing missing, nothing extra
    config = model.config
    assert config.model_type == "qwen3_vl_moe"
    assert config.text_config.num_experts == 16 and config.text_config.num_experts_per_tok == 4
    assert 4 <= config.text_config.num_hidden_layers <= 6 and 128 <= config.text_config.hidden_size <= 256
    assert config.vision_config.deepstack_visual_indexes
    assert len(processor.tokenizer) <= 4096 and processor.chat_template
    assert (DEMO / "README.md").is_file()


def test_image_tasks_well_above_chance(demo):
    """Exact match on PER_TASK held-out questions per task, teacher-forced in one batched forward
    (candidates._token_metrics' answer_correct: top-1 is the reference at every answer position, which is
    when greedy decoding reproduces it); the test stage's own greedy generation agrees on one per task."""
    model, processor = demo
    by_task: dict[str, list] = {}
    for s in read_source("tasks", "evaluation"):
        by_task.setdefault(s.task, []).append(s)
    assert set(by_task) == TASKS
    samples = [s for task in sorted(by_task) for s in by_task[task][:PER_TASK]]
    correct = {}
    for batch in make_batches(samples, processor, max_seq_len=128, batch_size=len(samples), answers=True):
        with torch.inference_mode():
            logits = model(**batch.inputs, use_cache=False).logits
        m = _token_metrics(logits, logits, batch.inputs["input_ids"], batch.modality, batch.answer_mask)
        correct.update({s.id: bool(c) for s, c in zip(batch.samples, m["answer_correct"], strict=True)})
    assert len(correct) == len(samples)
    for task in sorted(TASKS):
        group = by_task[task][:PER_TASK]
        accuracy = sum(correct[s.id] for s in group) / len(group)
        chance = Counter(s.answer for s in group).most_common(1)[0][1] / len(group)
        assert accuracy >= chance + MARGIN, (task, accuracy, chance)
    firsts = [by_task[task][0] for task in sorted(TASKS)]
    rows = generate(model, processor, firsts, 8, TestSettings())
    assert [r["correct"] for r in rows] == [correct[s.id] for s in firsts]


def test_text_perplexity_far_below_unigram(demo):
    model, processor = demo
    for name in TEXT_SETS:
        samples = list(read_source(name, "evaluation"))[:2]
        [batch] = make_batches(samples, processor, max_seq_len=256, batch_size=2)
        with torch.inference_mode():
            logits = model(**batch.inputs, use_cache=False).logits
        ok = (batch.modality[:, 1:] == 0) & (batch.modality[:, :-1] >= 0)
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, batch.inputs["input_ids"][:, 1:, None])[..., 0]
        ppl = math.exp(float(-(lp * ok).sum() / ok.sum()))
        assert ppl < 150, (name, ppl)  # the unigram baseline is >= 460 on every domain
