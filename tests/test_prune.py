"""Shard surgery: the pruned checkpoint equals the original with removed experts masked (the oracle),
for every on-disk layout; quantized exports; byte identity; refusals; crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from reap_vlm.checkpoint import inspect_checkpoint, plan_prune, write_pruned
from reap_vlm.checkpoint.layout import read_header
from reap_vlm.errors import CheckpointError, OutputError, PlanError
from reap_vlm.loading import load_model
from reap_vlm.masking import masked, removed_from_kept
from reap_vlm.moe import find_moe_blocks
from reap_vlm.tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ["qwen3_vl_moe", "qwen3_moe", "mixtral", "deepseek_v3", "glm4_moe", "gpt_oss", "qwen2_moe", "olmoe"]
FAST = {("qwen3_vl_moe", False), ("qwen3_moe", False), ("deepseek_v3", False), ("gpt_oss", True), ("mixtral", False)}


def _keep_plan(layout) -> dict[tuple[int, str], list[int]]:
    """A different kept set per layer; balanced over routing groups when the model has them."""
    rng = np.random.default_rng(0)
    keep = {}
    for key, E in sorted(layout.counts().items()):
        if layout.n_group > 1:
            size = E // layout.n_group
            keep[key] = sorted(
                int(g * size + j) for g in range(layout.n_group) for j in rng.choice(size, size - 1, replace=False)
            )
        else:
            keep[key] = sorted(int(j) for j in rng.choice(E, 5, replace=False))
    return keep


def _inputs(model_dir: Path, with_image: bool):
    from reap_vlm.calibration import load_samples, make_batches

    _, processor, _ = load_model(model_dir, device="cpu", dtype="float32")
    spec = "code:2,vision:2" if with_image else "code:2,writing:2"
    return list(
        make_batches(
            load_samples(spec, max_samples=4, seed=0),
            processor,
            max_seq_len=64,
            batch_size=4,
            min_pixels=1024,
            max_pixels=16384,
        )
    )


def _run(model, inputs: dict, kept=None, experts=None):
    """Logits, and the sorted top-k expert set of every token at every MoE block (original indices)."""
    picks, hooks = [], []
    for b in find_moe_blocks(model):

        def hook(_m, args, kwargs, key=b.key):
            idx = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
            if idx is None:  # Llama 4 runs every expert on pre-scaled copies: no index to compare
                return
            if kept is not None:  # pruned index -> original index; trailing zero experts shift by E - n
                table = torch.tensor(kept[key])
                n = len(table)
                idx = torch.where(idx < n, table[idx.clamp(max=n - 1)], idx - n + experts[key])
            picks.append(torch.sort(idx, dim=-1).values)

        hooks.append(model.get_submodule(b.experts).register_forward_pre_hook(hook, with_kwargs=True))
    with torch.inference_mode():
        logits = model(**inputs).logits
    for h in hooks:
        h.remove()
    return logits, picks


def prune_and_compare(src: Path, dst: Path, batches: list[dict], *, write=None, edit_original=None, atol=1e-4):
    """The exactness oracle: prune `src` on disk with a balanced random plan, reload both with
    from_pretrained, and check the pruned model against the original with the removed experts masked
    (identical top-k sets for every token, max |Δlogit| <= atol in fp32). Returns (layout, keep, pruned).

    Other methods through the same oracle: `write(layout, dst)` writes the checkpoint and returns its
    keep plan; `edit_original(model, blocks)` applies the method to the loaded original in memory first."""
    layout = inspect_checkpoint(src)
    if write is None:
        keep = _keep_plan(layout)
        write_pruned(plan_prune(layout, keep), dst)
    else:
        keep = write(layout, dst)
    original, _, _ = load_model(src, device="cpu", dtype="float32")
    pruned, _, _ = load_model(dst, device="cpu", dtype="float32")
    blocks = find_moe_blocks(original)
    if edit_original is not None:
        edit_original(original, blocks)
    kept = {f"{layer}.{s}": v for (layer, s), v in keep.items()}
    assert {b.key for b in blocks} == set(kept), "memory and disk disagree on the MoE blocks"
    for inputs in batches:
        with masked(original, blocks, removed_from_kept(blocks, kept)):
            ref_logits, ref_picks = _run(original, inputs)
        got_logits, got_picks = _run(pruned, inputs, kept, {b.key: b.num_experts for b in blocks})
        assert len(ref_picks) == len(got_picks)
        for a, b in zip(ref_picks, got_picks, strict=True):
            assert torch.equal(a, b)  # identical top-k sets for every token
        assert (ref_logits - got_logits).abs().max().item() <= atol
    return layout, keep, pruned


@pytest.mark.parametrize(
    ("family", "fused"),
    [
        pytest.param(f, fused, marks=() if (f, fused) in FAST else pytest.mark.slow)
        for f in FAMILIES
        for fused in (False, True)
    ],
)
def test_pruned_checkpoint_equals_masked_original(family, fused, tmp_path):
    src = make_tiny(family, tmp_path / "src", save_original_format=not fused)
    batches = [b.inputs for b in _inputs(src, with_image=family == "qwen3_vl_moe")]
    _, keep, pruned = prune_and_compare(src, tmp_path / "pruned", batches)
    assert find_moe_blocks(pruned)[0].num_experts == len(next(iter(keep.values())))


def test_vision_tower_and_non_expert_tensors_are_byte_identical(tmp_path):
    src = make_tiny("qwen3_vl_moe", tmp_path / "src")
    layout = inspect_checkpoint(src)
    dst = tmp_path / "pruned"
    write_pruned(plan_prune(layout, _keep_plan(layout)), dst)
    out = inspect_checkpoint(dst)
    visual = [n for n in layout.tensors if n.startswith("model.visual.")]
    assert any("deepstack_merger_list" in n for n in visual)
    for name, info in layout.tensors.items():
        if layout.roles[name].kind != "copy":
            continue
        o = out.tensors[name]
        with open(src / info.shard, "rb") as a, open(dst / o.shard, "rb") as b:
            a.seek(info.start)
            b.seek(o.start)
            assert a.read(info.nbytes) == b.read(o.nbytes), name
    config = json.loads((dst / "config.json").read_text())
    assert config["text_config"]["num_local_experts"] == 5
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    sizes = sum(t.nbytes for t in out.tensors.values())
    assert index["metadata"]["total_size"] == sizes and set(index["weight_map"]) == set(out.tensors)
    for name in ("tokenizer.json", "chat_template.jinja", "processor_config.json", "generation_config.json"):
        assert (dst / name).read_bytes() == (src / name).read_bytes()


def test_source_is_never_modified(tmp_path):
    src = make_tiny("qwen3_moe", tmp_path / "src")
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    layout = inspect_checkpoint(src)
    write_pruned(plan_prune(layout, _keep_plan(layout)), tmp_path / "out")
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_group_routing_refusal_and_collapse(tmp_path):
    src = make_tiny("deepseek_v3", tmp_path / "src")
    layout = inspect_checkpoint(src)
    unbalanced = {k: [0, 1, 2, 3, 4, 5] for k in layout.counts()}  # 4 from group 0, 2 from group 1
    with pytest.raises(PlanError, match=r"keeps \[4, 2\] experts in its 2 routing groups.*--collapse-groups"):
        plan_prune(layout, unbalanced)
    plan = plan_prune(layout, unbalanced, collapse_groups=True)
    assert plan.config["n_group"] == 1 and plan.config["topk_group"] == 1
    assert any("routing differs" in n for n in plan.notes)


def test_plan_validation(tmp_path):
    src = make_tiny("qwen3_moe", tmp_path / "src")
    layout = inspect_checkpoint(src)
    keys = sorted(layout.counts())
    with pytest.raises(PlanError, match="fewer than top_k=2"):
        plan_prune(layout, {k: [3] for k in keys})
    with pytest.raises(PlanError, match="does not cover"):
        plan_prune(layout, {keys[0]: [0, 1, 2]})
    with pytest.raises(PlanError, match="duplicate or out-of-range"):
        plan_prune(layout, {k: [0, 1, 9] for k in keys})
    with pytest.raises(PlanError, match="different numbers"):
        plan_prune(layout, {k: list(range(3 + i)) for i, k in enumerate(keys)})


def test_output_refusals(tmp_path):
    src = make_tiny("qwen3_moe", tmp_path / "src")
    layout = inspect_checkpoint(src)
    plan = plan_prune(layout, _keep_plan(layout))
    with pytest.raises(OutputError, match="overlaps the input"):
        write_pruned(plan, src)
    with pytest.raises(OutputError, match="overlaps the input"):
        write_pruned(plan, src / "inside")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep me")
    for overwrite in (False, True):  # a folder the tool did not write is never replaced, not even with --overwrite
        with pytest.raises(OutputError, match=r"already exists and is not empty.*no \.reap-vlm-output marker"):
            write_pruned(plan, tmp_path / "busy", overwrite=overwrite)
    assert (tmp_path / "busy" / "x").read_text() == "keep me"
    write_pruned(plan, tmp_path / "own")  # an earlier output of the tool: replaced with --overwrite only
    with pytest.raises(OutputError, match=r"earlier reap-vlm output.*pass --overwrite"):
        write_pruned(plan, tmp_path / "own")
    (tmp_path / "own" / "x").write_text("stale")
    write_pruned(plan, tmp_path / "own", overwrite=True)
    assert not (tmp_path / "own" / "x").exists() and (tmp_path / "own" / "config.json").exists()


def test_rebalanced_shards_and_single_file(tmp_path):
    src = make_tiny("qwen3_moe", tmp_path / "src")
    layout = inspect_checkpoint(src)
    keep = _keep_plan(layout)
    write_pruned(plan_prune(layout, keep, max_shard_size="200KB"), tmp_path / "many")
    assert len(list((tmp_path / "many").glob("model-*.safetensors"))) > 1
    write_pruned(plan_prune(layout, keep, max_shard_size="1GB"), tmp_path / "one")
    assert (tmp_path / "one" / "model.safetensors").is_file()
    for folder in ("many", "one"):
        model, _, _ = load_model(tmp_path / folder, device="cpu", dtype="float32")
        assert find_moe_blocks(model)[0].num_experts == 5
    # and a single-file source prunes too
    single = make_tiny("qwen3_moe", tmp_path / "single", max_shard_size="1GB")
    assert (single / "model.safetensors").is_file()
    write_pruned(plan_prune(inspect_checkpoint(single), keep), tmp_path / "from_single")
    assert (tmp_path / "from_single" / "model.safetensors").is_file()


# ---- quantized exports (synthetic, written with safetensors directly) ----------------------------

QUANT = {
    "awq": (lambda j, p: f"experts.{j}.{p}", {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16}),
    "gptq": (
        lambda j, p: f"experts.{j}.{p}",
        {"qweight": torch.int32, "qzeros": torch.int32, "scales": torch.float16, "g_idx": torch.int32},
    ),
    "compressed_tensors": (
        lambda j, p: f"experts.{j}.{p}",
        {"weight_packed": torch.int32, "weight_scale": torch.bfloat16, "weight_shape": torch.int64},
    ),
    "fp8": (lambda j, p: f"experts.{j}.{p}", {"weight": torch.float8_e4m3fn, "weight_scale_inv": torch.float32}),
    "modelopt": (
        lambda j, p: f"experts.{p.split('.')[0]}.{j}.{p.split('.', 1)[1]}",
        {"weight": torch.float8_e4m3fn, "weight_scale": torch.float32, "input_scale": torch.float32},
    ),
}


def _quantized_checkpoint(folder: Path, scheme: str, E: int = 8, layers: int = 2) -> None:
    name_of, suffixes = QUANT[scheme]
    gen = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=gen).bfloat16(),
        "model.visual.blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=gen).bfloat16(),
        "lm_head.weight": torch.randn(64, 32, generator=gen).bfloat16(),
    }
    for layer in range(layers):
        prefix = f"model.layers.{layer}.mlp."
        tensors[prefix + "gate.weight"] = torch.randn(E, 32, generator=gen).bfloat16()
        tensors[prefix + "shared_expert.down_proj.weight"] = torch.randn(32, 16, generator=gen).bfloat16()
        tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = torch.randn(32, 32, generator=gen).bfloat16()
        for j in range(E):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix, dtype in suffixes.items():
                    shape = (3,) if suffix == "weight_shape" else (1,) if suffix == "input_scale" else (8, 4)
                    value = (
                        torch.randint(0, 1000, shape, generator=gen)
                        if not dtype.is_floating_point
                        else torch.randn(shape, generator=gen)
                    )
                    tensors[prefix + name_of(j, f"{proj}.{suffix}")] = value.to(dtype)
    folder.mkdir(parents=True)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, part in shards.items():
        save_file({n: tensors[n] for n in part}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": 0}, "weight_map": {n: s for s, part in shards.items() for n in part}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "num_experts": E,
        "num_experts_per_tok": 2,
        "quantization_config": {"quant_method": scheme},
    }
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").write_text("{}")


@pytest.mark.parametrize("scheme", sorted(QUANT))
def test_quantized_exports_prune_by_name(scheme, tmp_path):
    src = tmp_path / "src"
    _quantized_checkpoint(src, scheme)
    layout = inspect_checkpoint(src)
    keep = {(0, "experts"): [1, 2, 5, 7], (1, "experts"): [0, 3, 4, 6]}
    dst = tmp_path / "out"
    write_pruned(plan_prune(layout, keep), dst)
    name_of, suffixes = QUANT[scheme]

    def tensors(folder):
        out = {}
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        for shard in set(index["weight_map"].values()):
            with safe_open(str(folder / shard), "pt") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
        return out

    before, after = tensors(src), tensors(dst)
    for name in before:
        if ".experts." not in name and not name.endswith("gate.weight"):
            assert torch.equal(before[name].view(torch.uint8), after[name].view(torch.uint8)), name
    for (layer, _), kept in keep.items():
        prefix = f"model.layers.{layer}.mlp."
        assert torch.equal(after[prefix + "gate.weight"], before[prefix + "gate.weight"][kept])
        for new, old in enumerate(kept):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix in suffixes:
                    a = after[prefix + name_of(new, f"{proj}.{suffix}")]
                    b = before[prefix + name_of(old, f"{proj}.{suffix}")]
                    assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
        assert prefix + name_of(len(kept), "gate_proj." + next(iter(suffixes))) not in after
    config = json.loads((dst / "config.json").read_text())
    assert config["num_experts"] == 4 and config["quantization_config"] == {"quant_method": scheme}


def test_quantized_sibling_metadata_is_accepted_other_models_refused(tmp_path):
    from reap_vlm import metadata
    from reap_vlm.errors import MetadataError

    src = tmp_path / "awq"
    _quantized_checkpoint(src, "awq")
    layout = inspect_checkpoint(src)
    bf16_config = {k: v for k, v in layout.config.items() if k != "quantization_config"}
    meta = {
        "model": {
            "architecture": "Qwen3MoeForCausalLM",
            "config_sha256": metadata.config_hash(bf16_config),
            "blocks": [{"layer": layer, "expert_set": "experts", "num_experts": 8} for layer in (0, 1)],
        }
    }
    assert metadata.check_against(meta, layout.config, layout.counts()) == []
    meta["model"]["blocks"][0]["num_experts"] = 16
    with pytest.raises(MetadataError, match="does not match"):
        metadata.check_against(meta, layout.config, layout.counts())
    meta["model"]["architecture"] = "MixtralForCausalLM"
    with pytest.raises(MetadataError, match="made for MixtralForCausalLM"):
        metadata.check_against(meta, layout.config, layout.counts())


def test_unknown_tensor_inside_a_moe_block_is_an_error(tmp_path):
    src = tmp_path / "src"
    _quantized_checkpoint(src, "awq")
    shard = src / "model-00001-of-00002.safetensors"
    with safe_open(str(shard), "pt") as f:
        data = {k: f.get_tensor(k) for k in f.keys()}
    data["model.layers.0.mlp.mystery.weight"] = torch.zeros(2, 2)
    save_file(data, str(shard))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.mlp.mystery.weight"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"model\.layers\.0\.mlp\.mystery\.weight is inside the MoE block"):
        inspect_checkpoint(src)


def test_corrupt_inputs_are_clear_errors(tmp_path):
    src = make_tiny("qwen3_moe", tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:20])
    with pytest.raises(CheckpointError, match=r"is not a readable safetensors file|corrupt header|beyond the file"):
        inspect_checkpoint(src)
    src2 = make_tiny("qwen3_moe", tmp_path / "src2")
    sorted(src2.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(CheckpointError, match="the index names shard"):
        inspect_checkpoint(src2)
    assert read_header(sorted(src2.glob("model-*.safetensors"))[0])[1] > 8


# ---- crash safety ------------------------------------------------------------------------------

CHILD = """
import sys, time
from reap_vlm.checkpoint import inspect_checkpoint, plan_prune, write_pruned
layout = inspect_checkpoint(sys.argv[1])
keep = {k: [0, 2, 3, 5, 7] for k in layout.counts()}
write_pruned(plan_prune(layout, keep), sys.argv[2], progress=lambda name, n: time.sleep(0.004))
print("done")
"""


def test_killed_writer_leaves_nothing_and_rerun_succeeds(tmp_path):
    src = make_tiny("qwen3_moe", tmp_path / "src")
    dst = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    reference = None
    delays = np.linspace(0.05, 1.2, 20)
    completed = 0
    for delay in delays:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(src), str(dst)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        time.sleep(delay)
        child.send_signal(signal.SIGKILL)
        child.wait()
        if dst.exists():  # the rename happened: the target must be complete and verified
            completed += 1
            layout = inspect_checkpoint(dst)
            assert layout.num_experts == 5
            files = {p.name: p.read_bytes() for p in dst.iterdir()}
            reference = reference or files
            assert files == reference
            import shutil

            shutil.rmtree(dst)
    # a rerun cleans every stale temporary folder and succeeds
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(dst)], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and "done" in out.stdout
    assert not list(tmp_path.glob(".out.reap-tmp-*"))
    assert inspect_checkpoint(dst).num_experts == 5
    assert completed < len(delays)  # most kills landed mid-write
