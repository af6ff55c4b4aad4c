"""Scoring: every criterion against a brute-force loop, mode agreement, modalities, resume, selection."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from reap_vlm import scoring
from reap_vlm.calibration import load_samples, make_batches
from reap_vlm.errors import PlanError
from reap_vlm.moe import expert_weights, find_moe_blocks
from reap_vlm.moe.spec import expert_output
from reap_vlm.observe import Observer
from reap_vlm.observe.kernel import all_expert_gram_norms
from reap_vlm.settings import CRITERIA, ReapSettings
from reap_vlm.tiny import build

PIXELS = {"min_pixels": 1024, "max_pixels": 16384}


@pytest.fixture(scope="module")
def vl():
    model, processor = build("qwen3_vl_moe", seed=3)
    samples = load_samples("code:3,writing:2,vision:3", max_samples=8, seed=1)
    # batch size 3 with samples of different lengths: every batch has right padding
    batches = list(make_batches(samples, processor, max_seq_len=96, batch_size=3, **PIXELS))
    assert any((b.modality == -1).any() for b in batches) and any((b.modality == 1).any() for b in batches)
    return model, processor, batches


def _observe(model, batches, mode):
    blocks = find_moe_blocks(model)
    with Observer(model, blocks, mode, budget_mb=1) as obs, torch.inference_mode():  # tiny budget: many chunks
        for b in batches:
            obs.set_modality(b.modality)
            model(**b.inputs)
    return obs.export()


def _brute_force(model, batches):
    """Plain loops over tokens and experts, from captured inputs and output_router_logits."""
    blocks = find_moe_blocks(model)
    captured = {b.key: [] for b in blocks}
    hooks = [
        model.get_submodule(b.experts).register_forward_pre_hook(
            lambda _m, args, key=b.key: captured[key].append((args[0].clone(), args[1].clone(), args[2].clone()))
        )
        for b in blocks
    ]
    logits_per_batch = []
    with torch.inference_mode():
        for b in batches:
            out = model(**b.inputs, output_router_logits=True)
            logits_per_batch.append(out.router_logits)
    for h in hooks:
        h.remove()
    result = {}
    for li, block in enumerate(blocks):
        experts = model.get_submodule(block.experts)
        E, inter = block.num_experts, experts.gate_up_proj.shape[1] // 2
        acc = {
            m: {k: [0.0] * E for k in ("count", "gate_sum", "gate_norm_sum", "norm_sum", "prob_sum", "soft_norm_sum")}
            | {"max_abs": [0.0] * E, "tokens": 0}
            for m in ("text", "image")
        }
        for bi, b in enumerate(batches):
            hidden, idx, weights = captured[block.key][bi]
            probs = torch.softmax(logits_per_batch[bi][li].double(), -1)
            for t, mod in enumerate(b.modality.reshape(-1).tolist()):
                if mod < 0:
                    continue
                a = acc["text" if mod == 0 else "image"]
                a["tokens"] += 1
                x = hidden[t].double()
                for j in range(E):
                    gate_up = experts.gate_up_proj[j].double()
                    h = torch.nn.functional.silu(gate_up[:inter] @ x) * (gate_up[inter:] @ x)
                    f = experts.down_proj[j].double() @ h
                    norm = float(f.detach().norm())
                    p = float(probs[t, j])
                    a["prob_sum"][j] += p
                    a["soft_norm_sum"][j] += p * norm
                    if j in idx[t].tolist():
                        g = float(weights[t, idx[t].tolist().index(j)])
                        a["count"][j] += 1
                        a["gate_sum"][j] += g
                        a["gate_norm_sum"][j] += g * norm
                        a["norm_sum"][j] += norm
                        a["max_abs"][j] = max(a["max_abs"][j], float(f.detach().abs().max()))
        both = {
            k: [x + y for x, y in zip(acc["text"][k], acc["image"][k], strict=True)]
            for k in acc["text"]
            if k not in ("max_abs", "tokens")
        }
        both["max_abs"] = [max(x, y) for x, y in zip(acc["text"]["max_abs"], acc["image"]["max_abs"], strict=True)]
        both["tokens"] = acc["text"]["tokens"] + acc["image"]["tokens"]
        result[block.key] = {"all": both, **acc}
    return result


def test_every_criterion_matches_brute_force_in_full_and_routed_modes(vl):
    model, _, batches = vl
    reference = _brute_force(model, batches)
    for mode in ("full", "routed"):
        stats = _observe(model, batches, mode)
        for key, ref in reference.items():
            for modality in ("all", "text", "image"):
                assert stats[key][modality]["tokens"] == ref[modality]["tokens"]
                for criterion in CRITERIA:
                    if criterion == "soft_reap" and mode == "routed":
                        assert stats[key][modality]["soft_norm_sum"] is None
                        continue
                    got = scoring.criterion_scores(stats[key][modality], criterion)
                    want = scoring.criterion_scores(ref[modality], criterion)
                    finite = np.isfinite(want)
                    assert np.array_equal(finite, np.isfinite(got))
                    np.testing.assert_allclose(
                        got[finite], want[finite], rtol=1e-5, atol=1e-9, err_msg=f"{mode} {key} {modality} {criterion}"
                    )


def test_full_and_routed_give_identical_routed_statistics(vl):
    model, _, batches = vl
    full, routed = _observe(model, batches, "full"), _observe(model, batches, "routed")
    for key in full:
        for name in ("count", "gate_sum", "gate_norm_sum", "norm_sum", "max_abs", "prob_sum"):
            np.testing.assert_allclose(full[key]["all"][name], routed[key]["all"][name], rtol=1e-6, atol=1e-9)


def test_routed_mode_leaves_the_model_output_unchanged(vl):
    model, _, batches = vl
    blocks = find_moe_blocks(model)
    with torch.inference_mode():
        plain = model(**batches[0].inputs).logits
        with Observer(model, blocks, "routed") as obs:
            obs.set_modality(batches[0].modality)
            observed = model(**batches[0].inputs).logits
        after = model(**batches[0].inputs).logits
    assert torch.equal(plain, observed) and torch.equal(plain, after)
    assert model.config.text_config._experts_implementation != "reap_routed"  # restored


@pytest.mark.parametrize("mode", ["router", "full"])
def test_deferred_sums_equal_sums_added_per_block(vl, monkeypatch, mode):
    """The Observer adds the sums of all blocks together after the forward (flush); with FLUSH_BYTES 0 every
    block is added alone at its hook. Both give the same statistics; a batch run twice before a flush (a block
    waiting twice) counts twice."""
    from reap_vlm.observe import observer

    model, _, batches = vl
    together = _observe(model, batches, mode)
    monkeypatch.setattr(observer, "FLUSH_BYTES", 0)
    alone = _observe(model, batches, mode)
    twice = _observe(model, [batches[0], batches[0]], mode)
    monkeypatch.undo()
    with Observer(model, find_moe_blocks(model), mode, budget_mb=1) as obs, torch.inference_mode():
        obs.set_modality(batches[0].modality)
        model(**batches[0].inputs)
        model(**batches[0].inputs)
    doubled = obs.export()
    for key in together:
        for m in ("text", "image", "all"):
            for name, value in together[key][m].items():
                if value is None:
                    continue
                np.testing.assert_allclose(value, alone[key][m][name], rtol=1e-6, atol=1e-9, err_msg=name)
                np.testing.assert_allclose(doubled[key][m][name], twice[key][m][name], rtol=1e-6, atol=1e-9)
            assert together[key][m]["count"] == alone[key][m]["count"]


def test_precomputed_position_ids_leave_the_forward_unchanged(vl):
    """The M-RoPE position ids made once on the host (reap.py's data phase) are the ones the forward makes:
    the same logits bit for bit, in every batch with images (these have padding too); text batches get none,
    and the model's rope_deltas (generation state) is left alone."""
    import dataclasses

    from reap_vlm.execution.memory import precompute_positions

    model, _, batches = vl
    copies = [dataclasses.replace(b, inputs=dict(b.inputs)) for b in batches]
    model.model.rope_deltas = before = torch.tensor([[7]])
    assert precompute_positions(model, copies) == sum("image_grid_thw" in b.inputs for b in batches) > 0
    assert model.model.rope_deltas is before
    with torch.inference_mode():
        for b, c in zip(batches, copies, strict=True):
            assert ("position_ids" in c.inputs) == ("image_grid_thw" in b.inputs)
            if "position_ids" in c.inputs:
                assert c.inputs["position_ids"].device.type == "cpu" and "position_ids" not in b.inputs
                assert torch.equal(model(**b.inputs).logits, model(**c.inputs).logits)
    model.model.rope_deltas = None


@pytest.mark.parametrize("grouped", [False, True])
def test_precomputed_vision_inputs_leave_the_forward_unchanged(grouped):
    """The vision tower's inputs made once on the host (prepare_batches: rotary position ids, interpolation
    taps, attention boundaries, longest image; the grid sizes left on the host) give the logits and the
    full-mode statistics the model gives when it computes them itself, bit for bit, on images of several
    sizes, with the tower's SDPA per image and with the grouped attention; text batches get nothing."""
    import dataclasses

    from reap_vlm.execution.memory import forward, prepare_batches, prepare_inputs
    from reap_vlm.execution.vision import group_vision_attention

    model, processor = build("qwen3_vl_moe", seed=3)
    if grouped:
        group_vision_attention(model)
    samples = load_samples("vision:6,tasks:4", max_samples=10, seed=1)
    batches = list(make_batches(samples, processor, max_seq_len=96, batch_size=8, bucket=True, **PIXELS))
    copies = [dataclasses.replace(b, inputs=dict(b.inputs)) for b in batches]
    images = sum("image_grid_thw" in b.inputs for b in batches)
    assert images > 0 and prepare_batches(model, copies) == {"position_ids": images, "vision": images, "pinned": 0}
    for b, c in zip(batches, copies, strict=True):
        added = set(c.inputs) - set(b.inputs)
        if "image_grid_thw" in b.inputs:
            assert {"image_position_ids", "image_cu_seqlens", "image_interp_weights", "image_max_seqlen"} <= added
            assert prepare_inputs(model, c)["image_grid_thw"] is c.inputs["image_grid_thw"]  # left on the host
        else:
            assert not added
    grids = [b.inputs["image_grid_thw"] for b in copies if "image_grid_thw" in b.inputs]
    assert any(len(set(g.prod(-1).tolist())) > 1 for g in grids)  # images of several sizes in one batch
    with torch.inference_mode():
        for b, c in zip(batches, copies, strict=True):
            assert torch.equal(model(**b.inputs).logits, model(**prepare_inputs(model, c)).logits)
        # the forward does take them: other rotary positions change the logits
        c = next(c for c in copies if "image_grid_thw" in c.inputs)
        flipped = c.inputs["image_position_ids"].flip(0)
        wrong = dataclasses.replace(c, inputs={**c.inputs, "image_position_ids": flipped})
        assert not torch.equal(model(**prepare_inputs(model, c)).logits, model(**prepare_inputs(model, wrong)).logits)
    blocks = find_moe_blocks(model)
    stats = []
    for run in (batches, copies):
        with Observer(model, blocks, "full") as obs, torch.inference_mode():
            for b in run:
                obs.set_modality(b.modality)
                forward(model, b)
        stats.append(obs.export())
    assert stats[0] == stats[1]


def test_grouped_vision_attention_gives_the_same_outputs():
    """Qwen3-VL's vision attention with one SDPA call per image size (execution.vision) equals the per-image
    calls bit for bit: image features and logits, on images of three sizes in one batch; the text attention
    keeps its implementation."""
    from reap_vlm.execution.vision import GROUPED, group_vision_attention

    model, processor = build("qwen3_vl_moe", seed=3)
    samples = load_samples("vision:6,tasks:4", max_samples=10, seed=1)
    batches = list(make_batches(samples, processor, max_seq_len=96, batch_size=8, bucket=True, **PIXELS))
    images = [b for b in batches if "image_grid_thw" in b.inputs]
    assert any(len(set(b.inputs["image_grid_thw"].prod(-1).tolist())) > 2 for b in images)

    def run():
        with torch.inference_mode():
            feats = [
                model.model.get_image_features(b.inputs["pixel_values"], b.inputs["image_grid_thw"]) for b in images
            ]
            return [f.pooler_output for f in feats], [model(**b.inputs).logits for b in batches]

    (feats, logits), text = run(), model.config.text_config._attn_implementation
    assert group_vision_attention(model) > 0 and model.model.visual.config._attn_implementation == GROUPED
    grouped_feats, grouped_logits = run()
    assert model.config.text_config._attn_implementation == text
    pairs = [(a, b) for fa, fb in zip(feats, grouped_feats, strict=True) for a, b in zip(fa, fb, strict=True)]
    assert pairs and all(torch.equal(a, b) for a, b in pairs)
    assert all(torch.equal(a, b) for a, b in zip(logits, grouped_logits, strict=True))


def test_router_mode_equals_output_router_logits_topk():
    model, tokenizer = build("qwen3_moe", seed=2)
    samples = load_samples("code:4,math:2", max_samples=6, seed=0)
    batches = list(make_batches(samples, tokenizer, max_seq_len=64, batch_size=3))
    stats = _observe(model, batches, "router")
    blocks = find_moe_blocks(model)
    expected = {b.key: np.zeros(b.num_experts) for b in blocks}
    with torch.inference_mode():
        for batch in batches:
            out = model(**batch.inputs, output_router_logits=True)
            valid = batch.modality.reshape(-1) >= 0
            for block, logits in zip(blocks, out.router_logits, strict=True):
                top = torch.topk(torch.softmax(logits.float(), -1), block.top_k, dim=-1).indices[valid]
                expected[block.key] += np.bincount(top.reshape(-1).numpy(), minlength=block.num_experts)
    for key, counts in expected.items():
        assert stats[key]["all"]["count"] == counts.tolist()
        assert stats[key]["all"]["norm_sum"] == [0.0] * len(counts) and stats[key]["all"]["soft_norm_sum"] is None


def test_modality_sums_add_up(vl):
    model, _, batches = vl
    stats = _observe(model, batches, "full")
    for entry in stats.values():
        for name in ("count", "gate_sum", "gate_norm_sum", "norm_sum", "prob_sum", "soft_norm_sum"):
            np.testing.assert_allclose(np.add(entry["text"][name], entry["image"][name]), entry["all"][name])
        assert entry["text"]["tokens"] + entry["image"]["tokens"] == entry["all"]["tokens"]
        np.testing.assert_array_equal(
            np.maximum(entry["text"]["max_abs"], entry["image"]["max_abs"]), entry["all"]["max_abs"]
        )


def test_full_mode_chunking_does_not_change_results(vl):
    model, _, batches = vl
    blocks = find_moe_blocks(model)
    results = []
    for budget in (1, 4096):
        with Observer(model, blocks, "full", budget_mb=budget) as obs, torch.inference_mode():
            for b in batches:
                obs.set_modality(b.modality)
                model(**b.inputs)
        results.append(obs.export())
    for key in results[0]:
        np.testing.assert_allclose(
            results[0][key]["all"]["soft_norm_sum"], results[1][key]["all"]["soft_norm_sum"], rtol=1e-6
        )


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "nemotron_h"])  # plain / biases + clamped GLU / no gate
def test_gram_norms_equal_the_norms_of_the_expert_outputs(family):
    """Full mode's all-pair norms come from ‖W h + b‖² = hᵀ(WᵀW)h + 2(Wᵀb)·h + ‖b‖² (no f written): in fp32
    they equal the norms of the experts' actual outputs, one expert at a time, whatever the chunking."""
    model, _ = build(family)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    for b in find_moe_blocks(model)[:1]:
        w = expert_weights(model.get_submodule(b.experts))
        direct = torch.stack([expert_output(w, j, x).norm(dim=-1) for j in range(b.num_experts)], dim=1)
        for budget in (1, 64):
            gram = all_expert_gram_norms(w, x, budget)
            torch.testing.assert_close(gram, direct, rtol=1e-5, atol=1e-6)


# ---- selection ----------------------------------------------------------------------------


def _stats(count, gate_norm, max_abs=None):
    E = len(count)
    entry = {
        "tokens": 100,
        "count": count,
        "gate_sum": [c * 0.5 for c in count],
        "gate_norm_sum": gate_norm,
        "norm_sum": [g * 2 for g in gate_norm],
        "max_abs": max_abs or [1.0] * E,
        "prob_sum": [1.0] * E,
        "soft_norm_sum": [1.0] * E,
    }
    return {"all": entry, "text": entry, "image": entry}


def test_mean_and_sum_criteria_disagree_and_unrouted_experts_go_first():
    layer = _stats([10, 100, 0, 50], [9.0, 20.0, 0.0, 30.0])
    assert scoring.select(layer, criterion="reap", n_keep=2)[0] == [0, 3]  # means 0.9, 0.2, -inf, 0.6
    assert scoring.select(layer, criterion="reap_sum", n_keep=2)[0] == [1, 3]
    assert scoring.select(layer, criterion="frequency", n_keep=3)[0] == [0, 1, 3]


def test_n_keep_floor_at_top_k_names_the_largest_valid_ratio():
    assert scoring.n_keep_for(8, ratio=0.5, num_keep=0, top_k=2) == 4
    with pytest.raises(PlanError, match=r"keeps 1 of 8 experts, fewer than the model's top_k=2.*at most 0\.7500"):
        scoring.n_keep_for(8, ratio=0.9, num_keep=0, top_k=2)
    assert scoring.n_keep_for(128, ratio=0.3, num_keep=0, top_k=8, round_to=8) == 88  # 90 rounded down
    with pytest.raises(PlanError, match="fewer than"):
        scoring.n_keep_for(8, ratio=None, num_keep=1, top_k=2)


def test_group_balanced_selection():
    counts = [9, 8, 7, 6, 1, 2, 3, 4]  # group 0 = experts 0-3 dominates every criterion
    layer = _stats(counts, [float(c) for c in counts])
    kept, _ = scoring.select(layer, criterion="frequency", n_keep=4, n_group=2)
    assert kept == [0, 1, 6, 7]  # two from each group, not the four of group 0
    assert scoring.n_keep_for(8, ratio=0.4, num_keep=0, top_k=2, n_group=2) == 4  # 5 -> 4 (multiple of groups)


def test_super_experts_are_protected():
    layer = _stats([10] * 6, [1.0, 2.0, 3.0, 4.0, 5.0, 0.5], max_abs=[1.0, 1.1, 0.9, 1.0, 1.2, 50.0])
    kept, protected = scoring.select(layer, criterion="reap", n_keep=3)
    assert 5 in kept and "super expert" in protected[5]
    kept, protected = scoring.select(layer, criterion="reap", n_keep=3, protect_super=False)
    assert 5 not in kept and not protected


def test_either_modality_keeps_experts_strong_in_one_modality():
    text = {"tokens": 100, "count": [50, 50, 1, 0], "gate_norm_sum": [40.0, 30.0, 0.1, 0.0]}
    image = {"tokens": 100, "count": [1, 0, 5, 60], "gate_norm_sum": [0.1, 0.0, 1.0, 90.0]}
    both = {k: [a + b for a, b in zip(text[k], image[k], strict=True)] for k in ("count", "gate_norm_sum")}
    layer = {"all": {"tokens": 200, **both}, "text": text, "image": image}
    assert scoring.select(layer, criterion="reap_sum", n_keep=2, modality="text", protect_super=False)[0] == [0, 1]
    assert scoring.select(layer, criterion="reap_sum", n_keep=2, modality="either", protect_super=False)[0] == [0, 3]


def test_image_only_experts_survive_joint_but_not_text_calibration():
    """A tiny VLM whose first MoE router sends image tokens, and only them, to experts 6 and 7.

    Hidden dim 0 carries an "image" flag (0 for text: zero embedding column, attention kept out of it;
    large for image tokens via the vision merger's bias); dim 1 a "text" flag. Router rows of experts 6/7
    read only the image flag; the others read the text flag."""
    model, processor = build("qwen3_vl_moe", seed=5)
    text_model = model.model.language_model
    block = find_moe_blocks(model)[0]
    with torch.no_grad():
        text_model.embed_tokens.weight[:, 0] = 0.0
        text_model.embed_tokens.weight[:, 1] = 3.0
        text_model.layers[0].self_attn.o_proj.weight[:2, :] = 0.0
        merger = model.model.visual.merger.linear_fc2
        merger.weight[:2, :] = 0.0
        merger.bias[0], merger.bias[1] = 40.0, 0.0
        router = model.get_submodule(block.router)
        router.weight[:6, 0], router.weight[:6, 1] = -20.0, 20.0
        router.weight[6:, :] = 0.0
        router.weight[6:, 0] = 20.0
        model.get_submodule(block.experts).down_proj[6:] *= 8.0  # what images need, they need strongly
    results = {}
    for label, spec in (("text", "code:4,writing:4"), ("joint", "code:3,writing:2,vision:3")):
        batches = list(
            make_batches(load_samples(spec, max_samples=8, seed=0), processor, max_seq_len=96, batch_size=4, **PIXELS)
        )
        results[label] = _observe(model, batches, "routed")[block.key]
    joint = results["joint"]
    assert joint["image"]["count"][6] > 0 and joint["image"]["count"][7] > 0
    assert joint["text"]["count"][6] == joint["text"]["count"][7] == 0
    kept_text, _ = scoring.select(results["text"], criterion="reap", n_keep=4, protect_super=False)
    assert not {6, 7} & set(kept_text)  # text-only calibration ranks them last
    for policy in ("joint", "either"):
        kept, _ = scoring.select(joint, criterion="reap", n_keep=4, modality=policy, protect_super=False)
        assert {6, 7} <= set(kept), policy


# ---- the stage --------------------------------------------------------------------------------


def _settings(model_dir, out, **extra):
    from reap_vlm.settings import load

    argv = [
        "--model-path",
        str(model_dir),
        "--output-path",
        str(out),
        "--device",
        "cpu",
        "--max-samples",
        "12",
        "--max-seq-len",
        "96",
        "--batch-size",
        "3",
        "--eval-samples",
        "0",
        "--no-plots",
        "--min-pixels",
        "1024",
        "--max-pixels",
        "16384",
    ]
    for k, v in extra.items():
        argv += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return load(ReapSettings, argv, {})


def test_stage_writes_valid_metadata_and_resume_reproduces_it(tiny_vl_dir, tmp_path):
    from reap_vlm import metadata
    from reap_vlm.reap import CHECKPOINT_NAME, score

    full = score(_settings(tiny_vl_dir, tmp_path / "a"))
    assert metadata.read(tmp_path / "a" / "reap_metadata.json")["plan"]["criterion"] == "reap"
    assert full["calibration"]["tokens"]["image"] > 0

    class Stop(Exception):
        pass

    def interrupt(batch):
        if batch == 2:
            raise Stop

    settings = _settings(tiny_vl_dir, tmp_path / "b", checkpoint_every=1)
    with pytest.raises(Stop):
        score(settings, on_batch=interrupt)
    assert (tmp_path / "b" / CHECKPOINT_NAME).is_file() and not (tmp_path / "b" / "reap_metadata.json").exists()
    resumed = score(_settings(tiny_vl_dir, tmp_path / "b", checkpoint_every=1, resume=True))
    assert resumed["scoring"]["resumed"] is True and full["scoring"]["resumed"] is False
    assert json.dumps(resumed["layers"], sort_keys=True) == json.dumps(full["layers"], sort_keys=True)
    assert resumed["plan"] == full["plan"]
    assert not (tmp_path / "b" / CHECKPOINT_NAME).exists()
    # the merge statistics beside the metadata resume too (sums and the sampled activations)
    from reap_vlm.observe import merge_stats

    a, _ = merge_stats.read(tmp_path / "a" / merge_stats.FILE_NAME)
    b, _ = merge_stats.read(tmp_path / "b" / merge_stats.FILE_NAME)
    assert a.keys() == b.keys() and full["merge_stats"]["samples_per_block"] > 0
    for key in a:
        assert a[key]["activations"].shape[1] > 0
        for name in a[key]:
            torch.testing.assert_close(a[key][name], b[key][name], rtol=1e-6, atol=1e-7)


def test_stage_refuses_infeasible_plan_before_calibration(tiny_vl_dir, tmp_path):
    from reap_vlm.reap import score

    with pytest.raises(PlanError, match="fewer than the model's top_k=2"):
        score(_settings(tiny_vl_dir, tmp_path, num_keep=1))
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("score_fn, extra_columns", [("softmax", 0), ("softmax", 2), ("sigmoid", 1)])
def test_block_stats_match_a_loop_over_pairs(score_fn, extra_columns):
    """Padding rows, out-of-range expert ids (sentinels, zero experts) and logits with trailing
    non-expert columns, against plain Python loops in float64."""
    from reap_vlm.observe.stats import BlockStats, Rows

    g = torch.Generator().manual_seed(0)
    T, K, E = 40, 3, 6
    modality = torch.randint(-1, 2, (T,), generator=g)
    logits = torch.randn(T, E + extra_columns, generator=g)
    idx = torch.rand(T, E + 2, generator=g).argsort(dim=1)[:, :K] - 1  # distinct per row, -1 .. E
    weights, norms, peaks, all_norms = (torch.rand(T, n, generator=g) for n in (K, K, K, E))
    stats = BlockStats(E, soft=True, score_fn=score_fn)
    for half in (slice(0, 25), slice(25, T)):  # two batches
        rows = Rows.of(modality[half])
        stats.add(rows, idx[half], weights[half], logits[half], norms[half], peaks[half], all_norms[half])
    if score_fn == "sigmoid":
        probs = torch.sigmoid(logits.double())[:, :E]
    else:
        probs = torch.softmax(logits.double(), -1)[:, :E]
    want = {m: {f: [0.0] * E for f in ("count", "gate_sum", "norm_sum", "gate_norm_sum")} for m in (0, 1)}
    for m in (0, 1):
        want[m]["max_abs"] = [0.0] * E
        want[m]["prob_sum"] = probs[modality == m].sum(0).tolist()
        want[m]["soft_norm_sum"] = (probs * all_norms.double())[modality == m].sum(0).tolist()
    for t in range(T):
        for k in range(K):
            m, j = int(modality[t]), int(idx[t, k])
            if m < 0 or not 0 <= j < E:
                continue
            w, n = float(weights[t, k]), float(norms[t, k])
            for field, value in (("count", 1.0), ("gate_sum", w), ("norm_sum", n), ("gate_norm_sum", w * n)):
                want[m][field][j] += value
            want[m]["max_abs"][j] = max(want[m]["max_abs"][j], float(peaks[t, k]))
    got = stats.export("full")
    for name, m in (("text", 0), ("image", 1)):
        assert got[name]["tokens"] == int((modality == m).sum())
        assert got[name]["count"] == want[m]["count"]  # exact
        assert got[name]["max_abs"] == want[m]["max_abs"]  # exact
        for field in ("gate_sum", "norm_sum", "gate_norm_sum", "prob_sum", "soft_norm_sum"):
            np.testing.assert_allclose(got[name][field], want[m][field], rtol=1e-6, atol=1e-7, err_msg=field)
