"""Expert merging: grouping counts for every C (and the peer library's 8-instead-of-96 bug), alignment
recovers permuted copies exactly, identical experts merge to themselves, HC-SMoE, router rows."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_prune import _inputs, prune_and_compare  # the exactness oracle, shared with pruning

from reap_vlm.checkpoint import inspect_checkpoint, write_pruned
from reap_vlm.errors import PlanError
from reap_vlm.methods import merge, merge_checkpoint, merge_memory
from reap_vlm.moe import find_moe_blocks

PIXELS = {"min_pixels": 1024, "max_pixels": 16384}


def _layer(E=8, inter=6, hidden=5, seed=0, bias=False) -> merge.LayerExperts:
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    return merge.LayerExperts(
        r(E, inter, hidden),
        r(E, inter, hidden),
        r(E, hidden, inter),
        r(E, inter) if bias else None,
        r(E, inter) if bias else None,
        r(E, hidden) if bias else None,
    )


def _stats(E, hidden=16, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mean_out = torch.randn(E, hidden, generator=g, dtype=torch.float64)
    z = torch.randn(tokens, E, generator=g, dtype=torch.float64)
    saliency = torch.rand(E, generator=g, dtype=torch.float64).numpy()
    return mean_out, z.T @ z, saliency


def _peer_greedy(saliency, distance, k, group_size):
    """The published peer library's grouping, reduced to its bug: a group takes the nearest *unassigned*
    experts, and centroids are not reserved, so early groups swallow later centroids."""
    assigned = np.zeros(len(saliency), dtype=bool)
    groups = []
    for c in np.argsort(-np.asarray(saliency), kind="stable")[:k]:
        if assigned[c]:
            continue
        group = [int(j) for j in np.argsort(distance[c], kind="stable") if not assigned[j]][:group_size]
        assigned[group] = True
        groups.append(group)
    return groups


def test_peer_library_bug_128_experts_target_96_group_size_16_gives_96_groups():
    """Regression: with the peer library's defaults (C = 16, 128 experts, target 96) its greedy grouping let
    the first groups swallow later centroids and produced 8 groups instead of 96. Centroids are reserved
    here, so the count is the target in every layer."""
    E, k, C = 128, 96, 16
    for layer in range(3):
        mean_out, gram, s = _stats(E, seed=layer)
        d = merge.expert_distance(mean_out, gram)
        assert len(_peer_greedy(s, d, k, C)) == 8  # the bug, reproduced on the same data
        groups = merge.ream_groups(s, d, k, C)
        assert len(groups) == k
        assert sorted(j for g in groups for j in g) == list(range(E))
        assert max(len(g) for g in groups) <= C
        top = set(np.argsort(-s, kind="stable")[:k].tolist())
        assert {g[0] for g in groups} == top  # the k most salient experts are the centroids


@pytest.mark.parametrize("C", [0, 2, 3, 4, 8, 16, 33, 128])
@pytest.mark.parametrize(("E", "k"), [(128, 96), (128, 64), (128, 32), (64, 48), (8, 4), (8, 7), (8, 8), (60, 1)])
def test_group_count_equals_target_for_every_C(E, k, C):
    mean_out, gram, s = _stats(E, seed=E + k)
    d = merge.expert_distance(mean_out, gram)
    if C and k * C < E:
        with pytest.raises(PlanError, match="cannot cover"):
            merge.ream_groups(s, d, k, C)
        return
    groups = merge.ream_groups(s, d, k, C)
    assert len(groups) == k and sorted(j for g in groups for j in g) == list(range(E))
    if C:
        assert max(len(g) for g in groups) <= C


def test_pseudo_pruning_follows_the_official_order():
    """Worked example: the most salient centroid chooses its C-1 nearest free experts first."""
    # experts 0..5 on a line; saliency picks 0 and 5 as centroids (k = 2), C = 3
    pos = np.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    d = np.abs(pos[:, None] - pos[None, :])
    s = np.array([1.0, 0.1, 0.1, 0.1, 0.1, 0.9])
    assert merge.ream_groups(s, d, 2, 3) == [[0, 1, 2], [5, 4, 3]]
    # C = 0: nearest centroid; expert 2 is nearer 0, expert 3 nearer 5
    assert merge.ream_groups(s, d, 2, 0) == [[0, 1, 2], [5, 3, 4]]
    # C = 4: the first centroid takes three, the second the last one left
    assert merge.ream_groups(s, d, 2, 4) == [[0, 1, 2, 3], [5, 4]]


def test_zero_saliency_floor():
    s = merge.floor_saliency([0.0, 2.0, 0.25, 0.0, np.nan])
    assert s.tolist() == [0.25, 2.0, 0.25, 0.25, 0.25]
    assert merge.floor_saliency([0.0, 3.0, 1.0]).tolist() == [0.5, 3.0, 1.0]  # capped at 0.5
    assert merge.floor_saliency([0.0, 0.0]).tolist() == [1.0, 1.0]


def test_similarities_match_their_definitions():
    mean_out, gram, _ = _stats(6, tokens=40, seed=2)
    g = torch.Generator().manual_seed(2)
    torch.randn(6, 16, generator=g, dtype=torch.float64)
    z = torch.randn(40, 6, generator=g, dtype=torch.float64)  # the same draws as _stats
    cols = z.T / z.T.norm(dim=1, keepdim=True)
    d = torch.cdist(cols, cols).numpy()
    assert np.allclose(merge.router_similarity(gram, 6), 1 - d / d.max(), atol=1e-10)
    cos = torch.nn.functional.cosine_similarity(mean_out[:, None], mean_out[None], dim=-1).numpy()
    assert np.allclose(merge.output_similarity(mean_out), (cos + 1) / 2, atol=1e-12)


def test_permuted_copy_is_recovered_exactly_by_alignment():
    x = _layer(E=4, inter=12, hidden=7, seed=1, bias=True)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(5))
    for t in (x.gate, x.up, x.gate_bias, x.up_bias):
        t[1] = t[0][perm]
    x.down[1] = x.down[0][:, perm]
    x.down_bias[1] = x.down_bias[0]
    h = torch.randn(4, 30, 12, dtype=torch.float64)
    h[1] = h[0][:, perm]
    for acts in (None, h):
        merged = merge.merge_layer(x, [[0, 1], [2], [3]], [0.7, 0.3, 1.0, 1.0], acts)
        inverse = torch.argsort(perm).numpy()
        assert np.array_equal(merged[0].perms[0], inverse)
        for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
            got = getattr(merged[0], name).to(torch.float32)
            assert torch.equal(got, getattr(x, name)[0]), name  # merged == centroid, bit for bit


def test_identical_experts_merge_to_themselves_and_singletons_are_untouched():
    x = _layer(E=6, seed=3, bias=True)
    for t in x.tensors():
        t[3] = t[1]
        t[5] = t[1]
    merged = merge.merge_layer(x, [[1, 3, 5], [0], [2], [4]], [0.2, 3.0, 1.0, 0.0, 0.5, 2.0])
    for m, c in zip(merged, (1, 0, 2, 4), strict=True):
        assert m.centroid == c
        for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
            assert torch.equal(getattr(m, name).to(torch.float32), getattr(x, name)[c]), (c, name)


def test_saliency_weighted_average_of_aligned_members():
    x = _layer(E=3, inter=5, hidden=4, seed=4)
    (m,) = merge.merge_layer(x, [[2, 0, 1]], [1.0, 3.0, 4.0], align_neurons=False)
    w = np.array([4.0, 1.0, 3.0]) / 8.0
    expect = w[0] * x.up[2].double() + w[1] * x.up[0].double() + w[2] * x.up[1].double()
    assert torch.allclose(m.up, expect, atol=1e-12)
    assert np.allclose(m.weights, w)
    # with alignment every member is permuted first; the average is of the aligned rows
    (a,) = merge.merge_layer(x, [[2, 0, 1]], [1.0, 3.0, 4.0])
    aligned = [x.up[2].double()] + [x.up[j].double()[p] for j, p in zip((0, 1), a.perms, strict=True)]
    assert torch.allclose(a.up, sum(wi * t for wi, t in zip(w, aligned, strict=True)), atol=1e-12)
    assert all(sorted(p.tolist()) == list(range(5)) for p in a.perms)


def test_hc_smoe_groups_exactly_k_with_nearest_member_as_centroid():
    # three clear clusters in the mean outputs
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    pts = torch.cat([c + 0.1 * torch.randn(4, 2, generator=g, dtype=torch.float64) for c in centers])
    groups = merge.hc_groups(pts, 3)
    assert sorted(sorted(gr) for gr in groups) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    for gr in groups:
        m = pts[gr].mean(0)
        assert gr[0] == gr[int(np.argmin(((pts[gr] - m) ** 2).sum(1)))]
    for k in (1, 5, 11, 12):
        assert len(merge.hc_groups(pts, k)) == k
    mean_out, _, s = _stats(128, seed=7)
    assert len(merge.hc_groups(mean_out, 96, s)) == 96


def test_router_rows_centroid_or_average():
    router = torch.randn(5, 3, dtype=torch.float64)
    groups = [[3, 0], [1], [4, 2]]
    s = [1.0, 1.0, 3.0, 3.0, 1.0]
    assert torch.equal(merge.merged_router(router, groups, s), router[[3, 1, 4]])
    avg = merge.merged_router(router, groups, s, "average")
    assert torch.allclose(avg[0], 0.75 * router[3] + 0.25 * router[0])
    assert torch.allclose(avg[2], 0.25 * router[4] + 0.75 * router[2])
    assert torch.equal(avg[1], router[1])


# ---- the statistics merging needs (full-mode scoring) -------------------------------------------


def _brute_merge_stats(model, batches):
    """Σ p h, Σ p, Σ z zᵀ, mean p·f and every token's h per block, by plain tensor algebra on the
    captured expert inputs and router logits (padding excluded)."""
    from reap_vlm.moe import find_moe_blocks

    blocks = find_moe_blocks(model)
    seen = {b.key: [] for b in blocks}
    hooks = []
    for b in blocks:
        hooks.append(
            model.get_submodule(b.experts).register_forward_pre_hook(
                lambda _m, args, key=b.key: seen[key].append(["x", args[0].clone()])
            )
        )
        hooks.append(
            model.get_submodule(b.router).register_forward_hook(
                lambda _m, _a, out, key=b.key: seen[key].append(["z", out[0].clone()])
            )
        )
    with torch.inference_mode():
        for batch in batches:
            model(**batch.inputs)
    for h in hooks:
        h.remove()
    ref = {}
    for b in blocks:
        experts = model.get_submodule(b.experts)
        gu, down = experts.gate_up_proj.detach().double(), experts.down_proj.detach().double()
        inter = gu.shape[1] // 2
        xs = [t for kind, t in seen[b.key] if kind == "x"]
        zs = [t for kind, t in seen[b.key] if kind == "z"]
        keep = torch.cat([batch.modality.reshape(-1) >= 0 for batch in batches])
        x, z = torch.cat(xs)[keep].double().clone(), torch.cat(zs)[keep].double().clone()
        p = torch.softmax(z, -1)
        proj = torch.einsum("eoh,th->eto", gu, x)
        h = torch.nn.functional.silu(proj[..., :inter]) * proj[..., inter:]  # [E, T, I]
        f = torch.einsum("ehi,eti->eth", down, h)
        ref[b.key] = {
            "gated_hidden_sum": torch.einsum("te,eti->ei", p, h),
            "prob_sum": p.sum(0),
            "router_logit_gram": z.T @ z,
            "mean_gated_output": torch.einsum("te,eth->eh", p, f) / x.shape[0],
            "tokens": x.shape[0],
            "h": h,
        }
    return ref


def test_full_mode_merge_statistics_match_brute_force():
    from reap_vlm.calibration import load_samples, make_batches
    from reap_vlm.moe import find_moe_blocks
    from reap_vlm.observe import Observer
    from reap_vlm.observe.merge_stats import MergeStats
    from reap_vlm.tiny import build

    model, processor = build("qwen3_vl_moe", seed=3)
    samples = load_samples("code:2,vision:2", max_samples=4, seed=1)
    batches = list(make_batches(samples, processor, max_seq_len=64, batch_size=3, min_pixels=1024, max_pixels=16384))
    assert any((b.modality == -1).any() for b in batches)
    ref = _brute_merge_stats(model, batches)
    blocks = find_moe_blocks(model)
    collector = MergeStats(blocks, samples=10, per_batch=6, seed=0)
    with Observer(model, blocks, "full", budget_mb=1, merge=collector) as obs, torch.inference_mode():
        for batch in batches:
            obs.set_modality(batch.modality)
            model(**batch.inputs)
    got = collector.tensors()
    for key, r in ref.items():
        assert int(got[f"{key}.tokens"]) == r["tokens"]
        for name in ("gated_hidden_sum", "prob_sum", "router_logit_gram", "mean_gated_output"):
            torch.testing.assert_close(got[f"{key}.{name}"].double(), r[name], rtol=1e-5, atol=1e-6, msg=name)
        acts = got[f"{key}.activations"].double()  # [E, 10, I], the same 10 tokens for every expert
        assert acts.shape == (r["h"].shape[0], 10, r["h"].shape[2])
        for s in range(acts.shape[1]):  # each sample is one real token's h, in bfloat16
            err = (r["h"] - acts[:, s : s + 1]).abs().amax(dim=(0, 2))
            assert err.min() <= 2e-2 * max(float(r["h"].abs().max()), 1.0)


def test_merge_statistics_file_round_trip_and_refusals(tmp_path):
    from reap_vlm.errors import MetadataError
    from reap_vlm.observe import merge_stats
    from reap_vlm.observe.merge_stats import MergeStats

    assert merge_stats.sample_budget([(128, 768, 2048, 128)] * 48, 512) == (
        ((512 << 20) - 48 * (128 * 2048 * 4 + 128 * 128 * 8 + 128 * 8 + 8)) // (48 * 128 * 768 * 2)
    )
    assert merge_stats.sample_budget([(8, 4, 4, 8)], 0) == 0
    with pytest.raises(MetadataError, match="REAP_SCORING_MODE=full"):
        merge_stats.read(tmp_path / "missing.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(MetadataError, match="unreadable"):
        merge_stats.read(tmp_path / "bad.safetensors")
    empty = MergeStats([], 0, 0)
    path = merge_stats.write(tmp_path / merge_stats.FILE_NAME, empty, {"samples_per_block": 0})
    assert merge_stats.read(path) == ({}, {"samples_per_block": 0})
    assert not list(tmp_path.glob(".*tmp*"))


# ---- on disk: the merged checkpoint equals the in-memory merge (the pruning oracle, shared) -------


def _synthetic_plan(layout, k=4, C=3, samples=12, seed=0):
    """Groups, saliency and activations per block from random statistics (the on-disk merge must equal
    the in-memory one whatever the statistics say)."""
    gen = torch.Generator().manual_seed(seed)
    groups, saliency, acts = {}, {}, {}
    sources = merge_checkpoint.block_sources(layout)
    reader = merge_checkpoint.ExpertReader(layout)
    for key, E in sorted(layout.counts().items()):
        inter = reader.experts(sources[key], [0]).up.shape[1]
        s = torch.rand(E, generator=gen, dtype=torch.float64).numpy()
        s[1] = 0.0  # a never-routed expert: floored, merged with a small weight
        mean_out = torch.randn(E, 8, generator=gen, dtype=torch.float64)
        z = torch.randn(40, E, generator=gen, dtype=torch.float64)
        groups[key] = merge.by_centroid(merge.ream_groups(s, merge.expert_distance(mean_out, z.T @ z), k, C))
        saliency[key] = merge.floor_saliency(s)
        acts[key] = torch.randn(E, samples, inter, generator=gen).to(torch.bfloat16)
    return groups, saliency, acts


def _merge_writer(plan_args, router_mode="centroid"):
    def write(layout, dst):
        groups, saliency, acts = plan_args
        plan = merge_checkpoint.plan_merge(layout, groups, saliency, acts, router_mode=router_mode)
        write_pruned(plan, dst)
        return plan.keep

    return write


def _in_memory(plan_args, router_mode="centroid"):
    def edit(model, blocks):
        merge_memory.apply_merge(model, blocks, *plan_args, router_mode=router_mode)

    return edit


@pytest.mark.parametrize(
    ("family", "fused", "router_mode"),
    [
        ("qwen3_vl_moe", True, "centroid"),  # fused [E, 2I, H] on disk, images in the batches
        ("qwen3_vl_moe", True, "average"),
        ("qwen3_moe", False, "centroid"),  # per-expert gate_proj / up_proj / down_proj
        ("mixtral", False, "centroid"),  # per-expert w1 / w3 / w2
        pytest.param("qwen3_moe", True, "average", marks=pytest.mark.slow),  # fused text model
    ],
)
def test_merged_checkpoint_equals_in_memory_merge(family, fused, router_mode, tmp_path):
    from reap_vlm.tiny import make_tiny

    src = make_tiny(family, tmp_path / "src", save_original_format=not fused)
    layout = inspect_checkpoint(src)
    plan_args = _synthetic_plan(layout)
    assert any(len(g) > 1 for gs in plan_args[0].values() for g in gs)
    batches = [b.inputs for b in _inputs(src, with_image=family == "qwen3_vl_moe")]
    prune_and_compare(
        src,
        tmp_path / "merged",
        batches,
        write=_merge_writer(plan_args, router_mode),
        edit_original=_in_memory(plan_args, router_mode),
        atol=1e-5,
    )
    # and the merged experts really differ from the centroids they replaced (merging did something)
    out = inspect_checkpoint(tmp_path / "merged")
    a = merge_checkpoint.ExpertReader(layout)
    b = merge_checkpoint.ExpertReader(out)
    key = sorted(layout.counts())[0]
    groups = plan_args[0][key]
    new = next(i for i, g in enumerate(groups) if len(g) > 1)
    before = a.experts(merge_checkpoint.block_sources(layout)[key], [groups[new][0]]).up
    after = b.experts(merge_checkpoint.block_sources(out)[key], [new]).up
    assert not torch.equal(before, after)


def test_merging_identical_experts_reproduces_the_model_exactly(tmp_path):
    """Groups of identical experts merge into that expert: the merged checkpoint equals the original with
    the non-centroids masked, without any in-memory edit (the pruning oracle, unchanged)."""
    from reap_vlm.loading import load_model
    from reap_vlm.tiny import make_tiny

    base = make_tiny("qwen3_moe", tmp_path / "base")
    layout = inspect_checkpoint(base)
    groups, saliency, acts = _synthetic_plan(layout)
    model, processor, _ = load_model(base, device="cpu", dtype="float32")
    with torch.no_grad():
        for b in find_moe_blocks(model):
            experts = model.get_submodule(b.experts)
            for g in groups[(b.layer, b.expert_set)]:
                for p in experts.parameters(recurse=False):
                    p[g[1:]] = p[g[0]].clone()
    src = tmp_path / "src"
    model.save_pretrained(src)
    processor.save_pretrained(src)
    batches = [b.inputs for b in _inputs(src, with_image=False)]
    prune_and_compare(src, tmp_path / "merged", batches, write=_merge_writer((groups, saliency, acts)), atol=1e-5)


def test_quantized_and_interleaved_experts_are_refused_with_one_line(tmp_path):
    from test_prune import _quantized_checkpoint

    from reap_vlm.errors import UnsupportedModelError
    from reap_vlm.tiny import make_tiny

    _quantized_checkpoint(tmp_path / "awq", "awq")
    with pytest.raises(UnsupportedModelError, match=r"cannot merge experts: .*qweight.*--method prune"):
        merge_checkpoint.block_sources(inspect_checkpoint(tmp_path / "awq"))
    src = make_tiny("gpt_oss", tmp_path / "gpt_oss")
    with pytest.raises(UnsupportedModelError, match="interleaved"):
        merge_checkpoint.block_sources(inspect_checkpoint(src))


def test_prune_stage_merge_method_end_to_end(tiny_vl_dir, tmp_path, capsys):
    """reap (full mode) writes the statistics; `prune_model.py --method merge` merges from them without the
    model and equals the in-memory merge of the same groups; refusals are one line with exit code 2."""
    import json

    from test_scoring import _settings

    from reap_vlm.cli import main
    from reap_vlm.observe import merge_stats
    from reap_vlm.prune import run
    from reap_vlm.reap import score

    out = tmp_path / "run"
    meta = score(_settings(tiny_vl_dir, out, num_keep=4))
    assert (out / merge_stats.FILE_NAME).is_file() and meta["merge_stats"]["samples_per_block"] > 1
    args = ["--model-path", str(tiny_vl_dir), "--output-path", str(out), "--method", "merge"]

    def write(_layout, dst):
        assert main("prune", run, [*args, "--pruned-model-path", str(dst), "--merge-group-size", "3"]) == 0
        info = json.loads((dst / "config.json").read_text())["reap_pruning"]
        assert info["method"] == "merge" and info["merge"]["group_size"] == 3
        assert all(len(gs) == 4 for gs in info["merge"]["groups"].values())
        assert "merged to 4 of 8 experts with REAP-VLM" in (dst / "README.md").read_text()
        return {(int(k.split(".")[0]), k.split(".", 1)[1]): v for k, v in info["kept"].items()}

    def edit(model, blocks):
        stats, _ = merge_stats.read(out / merge_stats.FILE_NAME)
        plan = merge_checkpoint.build_groups(
            meta, stats, 4, meta["plan"]["criterion"], group_size=3, modality=meta["plan"]["modality"]
        )
        merge_memory.apply_merge(model, blocks, *plan)

    batches = [b.inputs for b in _inputs(tiny_vl_dir, with_image=True)]
    prune_and_compare(tiny_vl_dir, tmp_path / "merged", batches, write=write, edit_original=edit, atol=1e-5)

    # the statistics of another run, or none at all: refused before anything is written
    other = tmp_path / "other"
    score(_settings(tiny_vl_dir, other, num_keep=4, merge_stats_mb=0))
    capsys.readouterr()
    assert not (other / merge_stats.FILE_NAME).exists()
    dst = tmp_path / "refused"
    code = main("prune", run, [*args[:-3], str(other), "--method", "merge", "--pruned-model-path", str(dst)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "records no merge statistics" in err[0] and not dst.exists()
    code = main(
        "prune",
        run,
        [
            *args,
            "--merge-stats-path",
            str(out / merge_stats.FILE_NAME),
            "--metadata-path",
            str(other / "reap_metadata.json"),
        ],
    )
    assert code == 2
    meta_other = json.loads((other / "reap_metadata.json").read_text())
    meta_other["merge_stats"] = meta["merge_stats"] | {"created": meta_other["created"]}
    (other / "reap_metadata.json").write_text(json.dumps(meta_other))
    code = main(
        "prune",
        run,
        [
            *args,
            "--merge-stats-path",
            str(out / merge_stats.FILE_NAME),
            "--metadata-path",
            str(other / "reap_metadata.json"),
            "--pruned-model-path",
            str(dst),
        ],
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "another scoring run" in err[-1] and not dst.exists()


@pytest.mark.slow  # about 2 minutes on two cores: scoring with plan measurement, then the direct check
def test_candidate_table_measures_merge_plans_in_the_live_model(tiny_vl_dir, tmp_path):
    """REAP_EVAL_MERGE: the merged weights are swapped in for the merge rows only (restored after), the rows'
    per-sample KL equals a direct forward of the merged, masked model, and a fixed criterion never picks merging."""
    from test_scoring import _settings

    from reap_vlm.calibration import make_batches
    from reap_vlm.candidates import _token_metrics, heldout_samples, measure_plans
    from reap_vlm.loading import load_model
    from reap_vlm.masking import masked, removed_from_kept
    from reap_vlm.observe import merge_stats
    from reap_vlm.reap import score

    settings = _settings(tiny_vl_dir, tmp_path, eval_merge=True, eval_samples=6, criterion="reap")
    meta = score(settings)
    rows = [r for r in meta["candidates"]["rows"] if r["policy"] == "merge"]
    assert [r["ratio"] for r in rows] == [0.5] and rows[0]["merge"]["group_size"] == 16  # where auto chooses
    assert meta["candidates"]["chosen"]["policy"] != "merge"

    model, processor, _ = load_model(tiny_vl_dir, device="cpu", dtype="float32")
    blocks = find_moe_blocks(model)
    batches = list(
        make_batches(heldout_samples(settings), processor, answers=True, max_seq_len=96, batch_size=3, **PIXELS)
    )
    stats, _ = merge_stats.read(tmp_path / merge_stats.FILE_NAME)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    table = measure_plans(
        model,
        blocks,
        meta,
        batches,
        criteria=("reap",),
        ratios=[0.5],
        modality="balanced",
        random_seeds=(),
        greedy_base="reap/balanced",
        merge_stats=stats,
    )
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored
    merge_row = next(r for r in table["rows"] if r["policy"] == "merge")
    prune_row = next(r for r in table["rows"] if r["policy"] == "balanced")
    kept = table["plans"][merge_row["plan_id"]]
    assert merge_row["plan_id"] != prune_row["plan_id"]
    groups, saliency, acts = merge_checkpoint.build_groups(meta, stats, 4, "reap", modality="balanced")
    got = [r["kl"] for r in table["_rows"]["plans"][merge_row["plan_id"]]]
    want = []
    with torch.inference_mode():
        references = [model(**b.inputs).logits for b in batches]
    merge_memory.apply_merge(model, blocks, groups, saliency, acts)
    with torch.inference_mode(), masked(model, blocks, removed_from_kept(blocks, kept)):
        for b, ref in zip(batches, references, strict=True):
            logits = model(**b.inputs).logits
            m = _token_metrics(ref, logits, b.inputs["input_ids"], b.modality, b.answer_mask)
            want += m["kl"].tolist()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
    assert sum(want) > 0


# ---- auto chooses between pruning and merging by the same objective ---------------------------------


def _choice_table(plans: dict, base: list, randoms: list) -> dict:
    """test_balanced's constructed table, its "reap/merge" row described as measure_plans describes a merge row."""
    from test_balanced import _table

    table = _table(plans, base, randoms)
    for row in table["rows"]:
        if row["policy"] == "merge":
            row["merge"] = {**merge.DEFAULTS, "group_size": 2, "base": "reap/balanced"}
    return table


def test_auto_chooses_merging_only_when_every_pruning_plan_is_measurably_worse():
    """Merge rows compete by the objective, the per-source floor and the bootstrap noise rule, as the least simple
    option: chosen when measurably better than every pruning plan, not within the noise, not below the floor, and
    never for a fixed criterion."""
    from test_balanced import _image, _rows, _text

    from reap_vlm.candidates import choose

    def pick(table, fixed=None):
        return choose(table, requested=0.5, default=("reap", "balanced"), fixed=fixed, seed=0)

    base = _rows({"code": _text(0.0), "charts": _image(0.0)})
    pruned = _rows({"code": _text(0.10), "charts": _image(0.20)})
    randoms = [_rows({"code": _text(0.5), "charts": _image(kl)}) for kl in (0.4, 0.5, 0.6)]
    better = _rows({"code": _text(0.02), "charts": _image(0.05)})
    table = _choice_table({"reap/balanced": pruned, "frequency/joint": pruned, "reap/merge": better}, base, randoms)
    chosen = pick(table)
    assert chosen["method"] == "merge" and chosen["criterion"] == "reap" and chosen["policy"] == "balanced"
    assert chosen["merge"] == {"grouping": "ream", "group_size": 2, "router": "centroid"}
    assert chosen["label"] == "merge from reap/balanced (ream C 2, centroid router)"
    assert "best objective" in chosen["reason"]
    fixed = pick(table, fixed=("reap", "balanced"))
    assert fixed["method"] == "prune" and "merge" not in fixed
    # within the noise of the merge plan: the pruning default (simpler)
    jitter = [0.049, 0.051] * 6
    c = _rows({"code": ("text", [(205, k * 100, 100.0) for k in jitter]), "charts": _image(0.05)})
    d = _rows({"code": ("text", [(205, k * 100 - 0.01, 100.0) for k in reversed(jitter)]), "charts": _image(0.05)})
    table = _choice_table({"reap/balanced": c, "reap/merge": d}, base, randoms)
    assert table["rows"][1]["objective"] < table["rows"][0]["objective"]
    chosen = pick(table)
    assert chosen["method"] == "prune" and "within the noise" in chosen["reason"] and "merge from" in chosen["reason"]
    # the best objective, but below the floor on one source: pruning
    randoms = [_rows({"code": _text(0.5), "charts": _image(kl)}) for kl in (0.25, 0.3, 0.35)]
    pruned = _rows({"code": _text(0.3), "charts": _image(0.2)})
    worse_on_charts = _rows({"code": _text(0.0), "charts": _image(0.35)})
    table = _choice_table({"reap/balanced": pruned, "reap/merge": worse_on_charts}, base, randoms)
    assert table["rows"][1]["objective"] < table["rows"][0]["objective"] and not table["rows"][1]["floor"]["ok"]
    assert pick(table)["method"] == "prune"


def _paired_experts(dst):
    """A tiny Qwen3-MoE whose experts come in pairs (2p, 2p + 1) that the router always selects together
    (identical router rows, sharpened) and that differ only in the down projection (the second: half the
    first's): each pair's output is 0.75 of its first member's. Pruning the second members leaves the first
    alone (1.0 of it: 0.25 off); REAM merging of the pairs (C 2) averages them by saliency (1 : 0.5), giving
    0.83 of it (0.08 off): merging is measurably better than any pruning plan."""
    from reap_vlm.moe import expert_weights
    from reap_vlm.tiny import build

    model, tokenizer = build("qwen3_moe", seed=0)
    with torch.no_grad():
        for b in find_moe_blocks(model):
            w = expert_weights(model.get_submodule(b.experts))
            router = model.get_parameter(b.router_weight)
            scale = w.down.flatten(1).norm(dim=1).mean()
            for a in range(0, b.num_experts, 2):
                w.down[a] *= scale / w.down[a].norm()  # equal norms: one member of every pair is a centroid
                w.gate[a + 1], w.up[a + 1], w.down[a + 1] = w.gate[a], w.up[a], 0.5 * w.down[a]
                router[a + 1] = router[a]
            router *= 10.0
    model.save_pretrained(dst, max_shard_size="300KB")
    tokenizer.save_pretrained(dst)
    return dst


def _auto_settings(src, out, *extra):
    from test_candidates import _settings as candidate_settings

    return candidate_settings(src, out, "--eval-ratios", "none", "--prune-ratio", "0.5", "--no-plots", *extra)


def test_auto_chooses_merge_where_it_wins_and_the_prune_stage_writes_that_merge(tmp_path, capsys):
    """Experts in pairs that merging reproduces better than pruning can: auto (criterion and method) chooses the
    merge plan, the table shows it beside the pruning plans, the metadata records the method and its settings,
    and `prune_model.py` without --method merges — the checkpoint equals the in-memory merge (the oracle)."""
    import json

    from reap_vlm.cli import main
    from reap_vlm.observe import merge_stats
    from reap_vlm.prune import run
    from reap_vlm.reap import score

    src, out = _paired_experts(tmp_path / "src"), tmp_path / "run"
    meta = score(_auto_settings(src, out, "--merge-group-size", "2"))
    err = capsys.readouterr().err
    plan, table = meta["plan"], meta["candidates"]
    assert plan["method"] == "merge" and plan["merge"] == {"grouping": "ream", "group_size": 2, "router": "centroid"}
    assert (plan["criterion"], plan["modality"], plan["policy"]) == ("reap", "balanced", "balanced")
    assert "auto: merge from reap/balanced (ream C 2, centroid router): best objective" in plan["chosen_by"]
    assert (out / merge_stats.FILE_NAME).is_file()
    stats, _ = merge_stats.read(out / merge_stats.FILE_NAME)
    groups, saliency, acts = merge_checkpoint.build_groups(meta, stats, 4, "reap", group_size=2, modality="balanced")
    assert all(sorted(g) == [g[0] - g[0] % 2, g[0] - g[0] % 2 + 1] for gs in groups.values() for g in gs)
    rows = {r["policy"]: r for r in table["rows"] if r["policy"] in ("merge", "balanced")}
    assert rows["merge"]["objective"] < 0.5 * rows["balanced"]["objective"]  # 0.08 vs 0.25 off: KL ~ 1/9
    assert rows["merge"]["floor"]["ok"] and table["merge_seconds"] > 0
    # the console table: both methods, the merge plan chosen
    cells = [[c.strip() for c in x.split("│")[1:-1]] for x in err.splitlines() if x.startswith("│")]
    merge_cells = next(c for c in cells if c[0] == "merge from")
    assert merge_cells[-1] == "chosen" and any(c[0] == "reap/balanced" and c[-1] == "" for c in cells)

    dst = tmp_path / "merged"

    def write(_layout, target):
        assert (
            main(
                "prune", run, ["--model-path", str(src), "--output-path", str(out), "--pruned-model-path", str(target)]
            )
            == 0
        )
        info = json.loads((target / "config.json").read_text())["reap_pruning"]
        assert info["method"] == "merge" and info["merge"]["group_size"] == 2 and info["merge"]["router"] == "centroid"
        return {(int(k.split(".")[0]), k.split(".", 1)[1]): v for k, v in info["kept"].items()}

    def edit(model, blocks):
        merge_memory.apply_merge(model, blocks, groups, saliency, acts)

    batches = [b.inputs for b in _inputs(src, with_image=False)]
    prune_and_compare(src, dst, batches, write=write, edit_original=edit, atol=1e-5)
    assert "method: merge (chosen by the reap stage)" in capsys.readouterr().err
    # --method prune: the merge plan's centroids, pruned, with a note
    pruned = tmp_path / "pruned"
    args = [
        "--model-path",
        str(src),
        "--output-path",
        str(out),
        "--pruned-model-path",
        str(pruned),
        "--method",
        "prune",
    ]
    assert main("prune", run, args) == 0
    assert "note: the reap stage chose merging" in capsys.readouterr().err
    info = json.loads((pruned / "config.json").read_text())["reap_pruning"]
    # the merge the reap stage chose needs its statistics: without them, one line and nothing written
    (out / merge_stats.FILE_NAME).rename(tmp_path / "moved.safetensors")
    code = main("prune", run, [*args[:-2], "--pruned-model-path", str(tmp_path / "refused")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and f"{merge_stats.FILE_NAME} does not exist" in lines[0]
    assert "--method prune" in lines[0] and not (tmp_path / "refused").exists()
    assert "merge" not in info and info["kept"] == {
        f"{layer}.{s}": sorted(g[0] for g in gs) for (layer, s), gs in groups.items()
    }


def test_auto_stays_with_pruning_where_merging_loses(tmp_path, capsys):
    """Random experts and REAM's default C 16 (the most salient expert absorbs every other one of 8): merging is
    measured beside the pruning plans and loses; auto keeps a pruning plan and the prune stage prunes."""
    import json

    from reap_vlm.cli import main
    from reap_vlm.prune import run
    from reap_vlm.reap import score
    from reap_vlm.tiny import make_tiny

    src, out = make_tiny("qwen3_moe", tmp_path / "src"), tmp_path / "run"
    meta = score(_auto_settings(src, out))
    rows = [r for r in meta["candidates"]["rows"] if r["ratio"] == 0.5]
    merge_row = next(r for r in rows if r["policy"] == "merge")
    assert merge_row["merge"]["group_size"] == 16
    assert meta["plan"]["method"] == "prune" and "merge" not in meta["plan"]
    assert merge_row["objective"] > meta["candidates"]["chosen"]["objective"]
    cells = [[c.strip() for c in x.split("│")[1:-1]] for x in capsys.readouterr().err.splitlines() if x.startswith("│")]
    assert next(c for c in cells if c[0] == "merge from")[-1] == "" and any(c[-1] == "chosen" for c in cells)
    dst = tmp_path / "pruned"
    assert (
        main("prune", run, ["--model-path", str(src), "--output-path", str(out), "--pruned-model-path", str(dst)]) == 0
    )
    assert "method: prune (chosen by the reap stage)" in capsys.readouterr().err
    assert "merge" not in json.loads((dst / "config.json").read_text())["reap_pruning"]


@pytest.mark.parametrize("gated", [True, False])
def test_lean_alignment_features_equal_the_plain_computation_bit_for_bit(gated):
    """merge._features (one float32 buffer, normalised and centred in place) gives exactly the numbers of
    neuron_rows + _unit_rows + pca_reduce, which hold three copies of the layer's experts at once."""
    from reap_vlm.methods import merge as m

    gen = torch.Generator().manual_seed(0)
    E, inter, H = 10, 24, 16
    gate = torch.randn(E, inter, H, generator=gen).bfloat16() if gated else None
    x = m.LayerExperts(
        gate, torch.randn(E, inter, H, generator=gen).bfloat16(), torch.randn(E, H, inter, generator=gen).bfloat16()
    )
    multi = [0, 2, 3, 7, 9]
    rows = m.neuron_rows(m.LayerExperts(*(None if t is None else t[multi] for t in x.tensors())))
    n = rows.shape[0]
    plain = m.pca_reduce(m._unit_rows(rows).reshape(n * inter, -1), 8).reshape(n, inter, -1)
    lean = m._features(x, multi, 8)
    assert sorted(lean) == multi
    for i, j in enumerate(multi):
        assert torch.equal(plain[i], lean[j])
