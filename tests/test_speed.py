"""The scoring stage's speed work keeps its numbers: logits made a chunk of positions at a time, the plan
measurement from final hidden states, the phases in the metadata, the whole-model bench on the CPU."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from reap_vlm.calibration import load_samples, make_batches
from reap_vlm.candidates import _token_metrics, sample_rows
from reap_vlm.execution.memory import Headless, prepare_inputs
from reap_vlm.loading import load_model
from reap_vlm.reap import score
from reap_vlm.settings import ReapSettings, load

ROOT = Path(__file__).resolve().parents[1]


def _case(seed: int = 0, rows: int = 3, width: int = 17, hidden: int = 8, vocab: int = 50):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.randn(vocab, hidden, generator=gen))
    ref, other = torch.randn(2, rows, width, hidden, generator=gen)
    ids = torch.randint(0, vocab, (rows, width), generator=gen)
    modality = torch.zeros(rows, width, dtype=torch.long)
    modality[1, 3:6] = 1  # image tokens
    modality[2, 11:] = -1  # padding
    answer = torch.zeros(rows, width, dtype=torch.bool)
    answer[0, 5:9] = True
    return head, ref, other, ids, modality, answer


@pytest.mark.parametrize("chunk_rows", [1, 5, 16, 40, 10**6])
def test_metrics_in_chunks_equal_one_pass(chunk_rows):
    head, ref, other, ids, modality, answer = _case()
    vocab = head.out_features
    with torch.no_grad():
        ref_logits, logits = head(ref), head(other)
        whole = _token_metrics(ref_logits, logits, ids, modality, answer, chunk_bytes=10**12)
        chunked = _token_metrics(ref_logits, logits, ids, modality, answer, chunk_bytes=chunk_rows * vocab * 24)
        from_hidden = _token_metrics(ref, other, ids, modality, answer, head=head, chunk_bytes=chunk_rows * vocab * 24)
        itself = _token_metrics(ref, ref, ids, modality, answer, head=head, chunk_bytes=chunk_rows * vocab * 24)
    assert whole.keys() == chunked.keys() == from_hidden.keys()
    for key in whole:
        assert torch.equal(whole[key], chunked[key]), key  # the same arithmetic per position
        torch.testing.assert_close(from_hidden[key], whole[key], rtol=1e-6, atol=1e-9)
    assert whole["tokens"].tolist() == [16.0, 13.0, 10.0] and whole["answer_tokens"].tolist() == [4.0, 0.0, 0.0]
    assert float(itself["kl"].abs().max()) == 0.0 and float(itself["agree"].sum()) == float(itself["tokens"].sum())


def test_plan_rows_from_hidden_states_equal_the_full_logits(tiny_vl_dir):
    model, processor, _ = load_model(tiny_vl_dir, device="cpu", dtype="float32")
    samples = load_samples("code:2,vision:2", "evaluation", max_samples=4, seed=0)
    batches = list(make_batches(samples, processor, max_seq_len=96, batch_size=2, min_pixels=1024, max_pixels=16384))
    headless = Headless(model)
    with torch.inference_mode():
        for batch in batches:
            inputs = prepare_inputs(model, batch)
            full = model(**inputs, use_cache=False).logits
            hidden, head = headless.run(inputs)
            assert head is not None and hidden.shape[:2] == full.shape[:2] and hidden.shape[-1] < full.shape[-1]
            want = sample_rows(batch, full, full, inputs["input_ids"])
            got = sample_rows(batch, hidden, hidden, inputs["input_ids"], head)
            assert [r["sample"] for r in got] == [r["sample"] for r in want]
            for a, b in zip(got, want, strict=True):
                numbers = {k for k, v in b.items() if isinstance(v, float)}
                assert {k: a[k] for k in a if k not in numbers} == {k: b[k] for k in b if k not in numbers}
                assert {k: a[k] for k in numbers} == pytest.approx({k: b[k] for k in numbers}, rel=1e-5, abs=1e-6)
    assert headless.exact is True

    # a model that changes its logits after the head (a scale, a soft cap) gets its full logits instead
    handle = model.register_forward_hook(lambda _m, _a, out: out.__setitem__("logits", out.logits * 2) or out)
    try:
        scaled = Headless(model)
        with torch.inference_mode():
            inputs = prepare_inputs(model, batches[0])
            logits, head = scaled.run(inputs)
            assert head is None and scaled.exact is False
            assert torch.equal(logits, model(**inputs, use_cache=False).logits)
    finally:
        handle.remove()


def test_metadata_records_seconds_per_phase(tiny_text_dir, tmp_path, capsys):
    argv = ["--model-path", str(tiny_text_dir), "--output-path", str(tmp_path / "o"), "--device", "cpu"]
    argv += ["--max-samples", "6", "--max-seq-len", "64", "--batch-size", "3", "--eval-samples", "2", "--no-plots"]
    meta = score(load(ReapSettings, argv, {}))
    phases = meta["scoring"]["phases"]
    assert list(phases) == ["load", "data", "scoring", "plans"]
    assert all(p["seconds"] >= 0 for p in phases.values())
    tokens = meta["calibration"]["tokens"]["text"] + meta["calibration"]["tokens"]["image"]
    assert phases["scoring"]["tokens"] == phases["data"]["tokens"] == tokens
    assert phases["scoring"]["tokens_per_s"] == pytest.approx(tokens / phases["scoring"]["seconds"], rel=1e-2)
    out = capsys.readouterr().err  # human output is on stderr
    assert "scoring: " in out and "tokens/s" in out and "phases" in out


@pytest.mark.slow
def test_whole_model_bench_runs_on_the_cpu(tmp_path):
    cmd = [sys.executable, str(ROOT / "bench" / "bench_reap.py"), "--small", "--work", str(tmp_path)]
    cmd += ["--sets", "text,combined", "--modes", "router", "--plans-in", "combined/router", "--profile", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "router mode: combined / text-only tokens/s" in done.stdout
    profile = (tmp_path / "profile.txt").read_text()
    assert "== combined router: 2 batches" in profile and "host syncs and copies:" in profile


def _observe(model, blocks, batches, mode):
    from reap_vlm.execution.memory import forward
    from reap_vlm.observe import Observer

    with Observer(model, blocks, mode) as obs, torch.inference_mode():
        for batch in batches:
            obs.set_modality(batch.modality)
            forward(model, batch)
    return obs.export()


def _close(a, b, path=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _close(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _close(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6), path
    else:
        assert a == b, path


def test_bucketed_batches_give_the_same_statistics(tiny_vl_dir):
    from reap_vlm.calibration import token_budget
    from reap_vlm.moe import find_moe_blocks

    model, processor, _ = load_model(tiny_vl_dir, device="cpu", dtype="float32")
    blocks = find_moe_blocks(model)
    samples = load_samples("combined", max_samples=14, seed=3, image_share=0.4)
    args = dict(max_seq_len=96, batch_size=3, min_pixels=1024, max_pixels=16384)
    fixed = list(make_batches(samples, processor, **args))
    buckets = list(make_batches(samples, processor, bucket=True, **args))
    assert sorted(i for b in fixed for i in b.sample_ids) == sorted(i for b in buckets for i in b.sample_ids)
    assert token_budget(fixed) == token_budget(buckets)
    for b in buckets:
        assert b.modality.numel() <= 3 * 96
        assert len({("pixel_values" in b.inputs) for _ in b.sample_ids}) == 1
        assert ("pixel_values" in b.inputs) == bool((b.modality == 1).any())
    padding = sum(int((b.modality < 0).sum()) for b in buckets)
    assert padding < sum(int((b.modality < 0).sum()) for b in fixed)
    assert any(len(b.sample_ids) > 3 for b in buckets)  # short rows many to a batch
    for mode in ("router", "full"):
        _close(_observe(model, blocks, buckets, mode), _observe(model, blocks, fixed, mode))


def test_mean_gated_outputs_a_few_experts_at_a_time(monkeypatch):
    from reap_vlm.moe import find_moe_blocks
    from reap_vlm.observe import Observer, merge_stats
    from reap_vlm.tiny import build

    model, processor = build("qwen3_vl_moe", seed=3)
    samples = load_samples("code:2,vision:2", max_samples=4, seed=1)
    batches = list(make_batches(samples, processor, max_seq_len=64, batch_size=3, min_pixels=1024, max_pixels=16384))
    blocks = find_moe_blocks(model)
    collector = merge_stats.MergeStats(blocks, samples=4, per_batch=2, seed=0)
    with Observer(model, blocks, "full", budget_mb=1, merge=collector) as obs, torch.inference_mode():
        for batch in batches:
            obs.set_modality(batch.modality)
            model(**batch.inputs)
    whole = collector.tensors()
    monkeypatch.setattr(merge_stats, "MEAN_CHUNK_BYTES", 1)  # one expert at a time
    chunked = collector.tensors()
    assert whole.keys() == chunked.keys()
    for name, t in whole.items():
        assert torch.equal(t, chunked[name]), name
