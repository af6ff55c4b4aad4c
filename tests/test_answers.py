"""Reference answers in held-out batches: the assistant turn, the answer-token mask and the metrics on it."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reap_vlm.calibration import make_batches, read_source
from reap_vlm.candidates import _token_metrics
from reap_vlm.loading import load_model


def write_image_questions(folder, n: int = 6) -> str:
    """A small JSONL of image questions with answers and tasks (solid-colour squares: which colour?)."""
    folder.mkdir(parents=True, exist_ok=True)
    colours = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220)}
    rows = []
    for i in range(n):
        name = list(colours)[i % 3]
        Image.new("RGB", (32 + 8 * i, 32), colours[name]).save(folder / f"sq{i}.png")
        task = "colour" if i % 2 == 0 else "size"
        question = "Which colour is this square?" if task == "colour" else "How wide is this image?"
        answer = name if task == "colour" else f"{32 + 8 * i} px"
        content = [{"type": "image", "image": f"sq{i}.png"}, {"type": "text", "text": question}]
        rows.append({"messages": [{"role": "user", "content": content}], "answer": answer, "task": task})
    rows.append({"text": "A text sample without an answer, for the text targets."})
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def vl(tiny_vl_dir):
    model, processor, _ = load_model(tiny_vl_dir, device="cpu", dtype="float32")
    return model, processor


def _samples(tmp_path):
    path = write_image_questions(tmp_path / "q")
    return list(read_source(path, "calibration")) + list(read_source(path, "evaluation"))


def test_samples_keep_task_and_answer(tmp_path):
    samples = _samples(tmp_path)
    images = [s for s in samples if s.kind == "image"]
    assert len(images) == 6 and {s.task for s in images} == {"colour", "size"}
    assert all(s.answer for s in images)
    assert next(s for s in samples if s.kind == "text").answer == ""


def test_answer_mask_marks_exactly_the_answer_and_end_of_turn(vl, tmp_path):
    _, processor = vl
    tok = processor.tokenizer
    samples = _samples(tmp_path)
    plain = list(make_batches(samples, processor, max_seq_len=256, batch_size=3))
    with_answers = list(make_batches(samples, processor, max_seq_len=256, batch_size=3, answers=True))
    assert all(b.answer_mask is None for b in plain)
    for batch in with_answers:
        assert batch.answer_mask.shape == batch.inputs["input_ids"].shape
        for row, s in enumerate(batch.samples):
            ids = batch.inputs["input_ids"][row][batch.answer_mask[row]].tolist()
            if not s.answer:
                assert ids == []
                continue
            assert tok.decode(ids) == s.answer + "<|im_end|>"
            # the answer is the assistant turn: the tokens just before it open that turn
            start = int(batch.answer_mask[row].nonzero().min())
            assert tok.decode(batch.inputs["input_ids"][row][:start]).endswith("<|im_start|>assistant\n")
            assert batch.modality[row][batch.answer_mask[row]].eq(0).all()
    # samples without an answer encode exactly as in the scoring batches
    text_plain = [b.inputs["input_ids"][r] for b in plain for r, s in enumerate(b.samples) if not s.answer]
    text_answ = [b.inputs["input_ids"][r] for b in with_answers for r, s in enumerate(b.samples) if not s.answer]
    n = int((text_plain[0] != tok.pad_token_id).sum())
    assert torch.equal(text_plain[0][:n], text_answ[0][:n])


def test_answer_loss_equals_a_direct_cross_entropy(vl, tmp_path):
    model, processor = vl
    batches = list(make_batches(_samples(tmp_path), processor, max_seq_len=256, batch_size=4, answers=True))
    pruned_like = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for batch in batches:
            logits = model(**batch.inputs, use_cache=False).logits
            other = logits + torch.randn(logits.shape, generator=pruned_like)  # a "pruned" model's logits
            m = _token_metrics(logits, other, batch.inputs["input_ids"], batch.modality, batch.answer_mask)
            for row in range(logits.shape[0]):
                positions = batch.answer_mask[row].nonzero().flatten().tolist()  # answer tokens, by position
                assert m["answer_tokens"][row] == len(positions)
                if not positions:
                    assert m["answer_nll"][row] == 0 and m["answer_correct"][row] == 0
                    continue
                pred = torch.tensor(positions) - 1  # the logits that predict each answer token
                target = batch.inputs["input_ids"][row, positions]
                direct = F.cross_entropy(other[row, pred].double(), target, reduction="sum")
                assert float(m["answer_nll"][row]) == pytest.approx(float(direct), rel=1e-6)
                p, q = F.softmax(logits[row, pred].double(), -1), F.softmax(other[row, pred].double(), -1)
                kl = float((p * (p.log() - q.log())).sum())
                assert float(m["answer_kl"][row]) == pytest.approx(kl, rel=1e-5)
                assert float(m["answer_overlap"][row]) == pytest.approx(float(torch.minimum(p, q).sum()), rel=1e-5)
                same = (logits[row, pred].argmax(-1) == other[row, pred].argmax(-1)).sum()
                assert m["answer_agree"][row] == same
                correct = bool((other[row, pred].argmax(-1) == target).all())
                assert m["answer_correct"][row] == float(correct)


def test_answer_correct_is_greedy_exact_match(vl, tmp_path):
    """Logits that put the answer's tokens first make every answer correct, and greedy decoding of the
    same rule writes the answer: answer_correct is the teacher-forced form of exact match."""
    model, processor = vl
    batch = next(make_batches(_samples(tmp_path), processor, max_seq_len=256, batch_size=8, answers=True))
    ids = batch.inputs["input_ids"]
    with torch.inference_mode():
        logits = model(**batch.inputs, use_cache=False).logits
    forced = logits.clone()
    forced[:, :-1].scatter_(-1, ids[:, 1:].unsqueeze(-1), 1e4)  # top-1 = the next token everywhere
    m = _token_metrics(logits, forced, ids, batch.modality, batch.answer_mask)
    has = m["answer_tokens"] > 0
    assert has.sum() == 6 and m["answer_correct"][has].eq(1).all()
    assert float(m["answer_nll"][has].max()) < 1e-6
    one_wrong = forced.clone()
    row = int(has.nonzero()[0])
    last = int(batch.answer_mask[row].nonzero().max())  # spoil only the end-of-turn prediction
    one_wrong[row, last - 1] = logits[row, last - 1]
    one_wrong[row, last - 1, ids[row, last]] = -1e4
    m2 = _token_metrics(logits, one_wrong, ids, batch.modality, batch.answer_mask)
    assert m2["answer_correct"][row] == 0 and m2["answer_correct"].sum() == 5


def test_text_model_without_a_template_gets_answer_then_eos(tiny_text_dir):
    from transformers import AutoTokenizer

    from reap_vlm.calibration import Sample

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    tok.chat_template = None
    sample = Sample("t/1", "t", [{"role": "user", "content": "What is 3 + 4?"}], answer=" 7 ", task="sum")
    batch = next(make_batches([sample], tok, max_seq_len=64, batch_size=1, answers=True))
    ids = batch.inputs["input_ids"][0]
    assert ids[batch.answer_mask[0]].tolist() == [*tok("7", add_special_tokens=False)["input_ids"], tok.eos_token_id]
    assert int(batch.answer_mask[0].nonzero().max()) == len(ids) - 1
    too_long = next(make_batches([sample], tok, max_seq_len=4, batch_size=1, answers=True), None)
    assert too_long is None  # an answer is never cut: the sample is skipped
