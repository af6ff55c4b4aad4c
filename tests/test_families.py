"""The family matrix (reap_vlm.families.MATRIX) as tests: every `pass` type prunes, in its default on-disk
format and in the fused format, to a checkpoint that equals the original with the removed experts masked,
and `verify` describes it; every `refused` type is refused with its reason; every `failed` type still
fails (so a fix is noticed); docs/supported-models.md is generated from the same table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_prune import prune_and_compare  # the oracle, shared with the per-format test

from reap_vlm.checkpoint import inspect_checkpoint
from reap_vlm.errors import SettingsError, UnsupportedModelError
from reap_vlm.families import MATRIX, render_doc
from reap_vlm.moe import find_moe_blocks
from reap_vlm.observe.observer import Observer
from reap_vlm.tiny import build, make_tiny
from reap_vlm.verify import describe

ROOT = Path(__file__).resolve().parents[1]
PASS = sorted(t for t, e in MATRIX.items() if e.status == "pass")
REFUSED = sorted(t for t, e in MATRIX.items() if e.status == "refused")
FAILED = sorted(t for t, e in MATRIX.items() if e.status == "failed")
# The default run covers the structural exceptions; `--all` / -m slow runs the whole matrix.
FAST = {"ernie4_5_vl_moe", "longcat_flash", "granitemoe", "llama4_text", "kimi_k25", "gemma4_text", "hy_v4"}


def _inputs(model_type: str) -> dict:
    ids = torch.randint(10, 1000, (2, 24), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids}
    if model_type == "ernie4_5_vl_moe":  # every third token goes through the vision experts
        inputs["moe_mm_token_type_ids"] = (torch.arange(24) % 3 == 0).long().expand(2, -1)
    return inputs


def _oracle(model_type: str, fused: bool, tmp_path: Path) -> Path:
    src = make_tiny(model_type, tmp_path / "src", save_original_format=not fused)
    layout, _, pruned = prune_and_compare(src, tmp_path / "pruned", [_inputs(model_type)])
    assert {b.num_experts for b in find_moe_blocks(pruned)} == {5 if layout.n_group == 1 else 6}
    return src


@pytest.mark.parametrize(
    ("model_type", "fused"),
    [
        pytest.param(t, fused, marks=() if t in FAST and not fused else pytest.mark.slow)
        for t in PASS
        for fused in (False, True)
    ],
)
def test_pruned_checkpoint_equals_masked_original(model_type, fused, tmp_path):
    src = _oracle(model_type, fused, tmp_path)
    info = describe(src, 0.25)  # verify reads it from config + headers
    assert info["moe_blocks"] >= 1 and info["experts"] == 8 and info["after"]["experts_kept"] == 6


def _scores(model, blocks, inputs, mode: str) -> dict:
    modality = torch.zeros(inputs["input_ids"].shape, dtype=torch.long)
    if "moe_mm_token_type_ids" in inputs:
        modality = inputs["moe_mm_token_type_ids"].clone()  # those tokens count as image tokens
    with Observer(model, blocks, mode) as obs:
        obs.set_modality(modality)
        with torch.inference_mode():
            model(**inputs)
    return obs.export()


@pytest.mark.parametrize("model_type", [pytest.param(t, marks=() if t in FAST else pytest.mark.slow) for t in PASS])
def test_scoring_runs_on_the_model_forward_in_every_mode(model_type):
    """The same detection serves scoring: the three modes see the same routing, and full mode's all-expert
    norms (reap_vlm's own GEMMs) agree with routed mode's (the model's own expert kernel) on routed pairs."""
    model, _ = build(model_type)
    blocks = find_moe_blocks(model)
    inputs = _inputs(model_type)
    runs = {mode: _scores(model, blocks, inputs, mode) for mode in ("full", "routed", "router")}
    tokens = inputs["input_ids"].numel()
    for key in runs["full"]:
        counts = [torch.tensor(runs[m][key]["all"]["count"]) for m in runs]
        assert all(torch.equal(counts[0], c) for c in counts[1:])
        block = next(b for b in blocks if b.key == key)
        assert 0 < counts[0].sum() <= tokens * block.top_k
        full, routed = (
            torch.tensor(runs[m][key]["all"]["gate_norm_sum"], dtype=torch.float64) for m in ("full", "routed")
        )
        assert torch.allclose(full, routed, rtol=1e-4, atol=1e-6), (full, routed)


@pytest.mark.parametrize("model_type", REFUSED)
def test_refused_types_are_refused_with_their_reason(model_type, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type}))
    with pytest.raises(UnsupportedModelError, match="cannot be expert-pruned exactly") as err:
        inspect_checkpoint(tmp_path)
    assert MATRIX[model_type].reason in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("model_type", FAILED)
def test_failed_types_still_fail(model_type, tmp_path):
    with pytest.raises(Exception) as err:  # any failure; a pass means the table must move it to "pass"
        _oracle(model_type, False, tmp_path)
    assert not isinstance(err.value, SettingsError), err.value  # the tiny builder did try this type


def test_supported_models_doc_is_generated_from_the_matrix():
    assert (ROOT / "docs" / "supported-models.md").read_text() == render_doc(), (
        "docs/supported-models.md is stale: run `python -m reap_vlm.families`"
    )
    assert len(PASS) >= 45
