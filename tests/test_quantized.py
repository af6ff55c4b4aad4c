"""Quantized checkpoints (reap_vlm.quantization): detected and reported by verify, dequantized bit for bit as
their producing library does, scored like their dequantized twin in memory and streamed, recorded in the
metadata, and pruned exactly. The tiny quantized checkpoints are made by the formats' own producers
(reap_vlm.tiny.quantize_checkpoint: transformers' Fp8Quantize, compressed-tensors' compressors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_prune import _inputs, prune_and_compare
from test_stream import _close

from reap_vlm.calibration import load_samples, make_batches
from reap_vlm.checkpoint import inspect_checkpoint
from reap_vlm.execution.memory import forward
from reap_vlm.execution.stream import StreamedModel, observe
from reap_vlm.loading import load_model
from reap_vlm.moe import find_moe_blocks
from reap_vlm.observe import Observer
from reap_vlm.quantization import detect
from reap_vlm.tiny import quantize_checkpoint

FORMATS = ("fp8", "ct-int4", "ct-fp8")
PIXELS = dict(min_pixels=1024, max_pixels=16384)


@pytest.fixture(scope="module")
def quantized(tiny_text_dir, tmp_path_factory):
    """format -> (quantized checkpoint, its dequantized twin: the same weights as a plain fp32 checkpoint)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for fmt in FORMATS:
        qdir = quantize_checkpoint(tiny_text_dir, root / fmt, fmt)
        out[fmt] = (qdir, _twin(qdir, root / f"{fmt}-twin"))
    return out


def _twin(qdir: Path, dst: Path) -> Path:
    """The quantized checkpoint's weights, dequantized by the reader, written as a plain checkpoint."""
    from reap_vlm.loading import _load_dequantizing

    config = json.loads((qdir / "config.json").read_text())
    model = _load_dequantizing(qdir, config, "cpu", "float32", False, "")
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(dst, max_shard_size="300KB", save_original_format=False)  # the fused layout it reads
    for f in qdir.iterdir():  # the processor's files
        if f.suffix not in (".safetensors", ".json") or f.name not in ("config.json", "model.safetensors.index.json"):
            if not (dst / f.name).exists():
                (dst / f.name).write_bytes(f.read_bytes())
    saved = json.loads((dst / "config.json").read_text())
    assert "quantization_config" not in saved
    return dst


@pytest.mark.parametrize(
    "fmt, expect",
    [
        ("fp8", {"format": "fp8", "bits": 8, "scheme": "block", "block_size": [16, 16]}),
        ("ct-int4", {"format": "compressed-tensors", "bits": 4, "scheme": "pack-quantized", "group_size": 16}),
        ("ct-fp8", {"format": "compressed-tensors", "bits": 8, "scheme": "float-quantized"}),
    ],
)
def test_verify_reports_format_bits_and_quantized_modules(fmt, expect, quantized, tmp_path):
    from reap_vlm.verify import describe

    qdir, twin = quantized[fmt]
    info = describe(qdir, 0.5)["quantization"]
    for key, value in expect.items():
        assert info[key] == value, key
    assert info["source"] == "config.json"
    # 4 layers x 8 experts x 3 projections, and 4 layers x q/k/v/o; routers, norms, head stay
    assert info["quantized"] == {"experts": 96, "attention": 16}
    assert info["quantized_kinds"] == "attention, experts"
    assert describe(twin, 0.5)["quantization"] is None
    # an export without quantization_config: found from the tensor names
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in qdir.iterdir():
        (bare / f.name).write_bytes(f.read_bytes())
    config = json.loads((bare / "config.json").read_text())
    del config["quantization_config"]
    (bare / "config.json").write_text(json.dumps(config))
    found = describe(bare, 0.5)["quantization"]
    assert found["source"] == "tensor names" and found["format"] == expect["format"]
    assert found["quantized"] == info["quantized"]
    if fmt == "fp8":
        assert found["block_size"] == [16, 16]  # from the weight and scale shapes


def _library_dequantized(qdir: Path, fmt: str) -> dict[str, torch.Tensor]:
    """Every quantized module's weight as the producing library dequantizes the whole checkpoint."""
    tensors = {}
    for shard in sorted(qdir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({n: f.get_tensor(n) for n in f.keys()})
    if fmt == "fp8":
        from compressed_tensors.entrypoints.convert.converters.fp8block_dequantizer import FP8BlockDequantizer

        names = [n.removesuffix("_scale_inv") for n in tensors if n.endswith(".weight_scale_inv")]
        out = FP8BlockDequantizer.from_pretrained(str(qdir), weight_block_size=(16, 16), dtype=torch.float32)
        done = out.process(dict(tensors))
        return {n: done[n] for n in names}
    from compressed_tensors.entrypoints.convert.converters.ct_dequantizer import CompressedTensorsDequantizer

    packed = {n.rpartition(".")[0] for n in tensors if n.endswith((".weight_packed", ".weight_scale"))}
    done = CompressedTensorsDequantizer(str(qdir), dtype=torch.float32).process(dict(tensors))
    return {f"{p}.weight": done[f"{p}.weight"] for p in packed}


@pytest.mark.parametrize("fmt", FORMATS)
def test_dequantized_weights_equal_the_producing_library(fmt, quantized):
    """Bit for bit: the reader's weights are the library's own dequantization (for FP8 also transformers'
    in-memory loader, which dequantizes on a CPU), and the model in memory equals the streamed layers."""
    qdir, _ = quantized[fmt]
    expected = _library_dequantized(qdir, fmt)
    model, _, _ = load_model(qdir, device="cpu", dtype="float32")
    streamed = StreamedModel(qdir, device="cpu", dtype="float32")
    reader = streamed.reader
    assert reader.quantization.format == detect(inspect_checkpoint(qdir).config, inspect_checkpoint(qdir)).format
    checked = 0
    for name, parts in reader.parts.items():
        if len(parts) == 1:
            continue
        with_parts = {}
        for p in parts:
            shard = reader.layout.tensors[p].shard
            with safe_open(str(qdir / shard), framework="pt") as f:
                with_parts[p] = f.get_tensor(p)
        got = reader.dequantizer.weight(with_parts)
        assert got.dtype == expected[name].dtype and torch.equal(got, expected[name]), name
        checked += 1
    assert checked == 112
    for i in range(len(streamed.layers)):
        reader.load(i)
        for name, p in streamed.layers[i].named_parameters():
            assert torch.equal(p, model.get_parameter(f"{streamed.layers_path}.{i}.{name}")), (i, name)
        reader.release(i)
    streamed.close()


def _statistics(model_dir: Path, mode: str, streamed: bool, spec: str = "code:3,writing:3") -> dict:
    if streamed:
        run = StreamedModel(model_dir, device="cpu", dtype="float32")
        model, processor = run.model, run.processor
    else:
        model, processor, _ = load_model(model_dir, device="cpu", dtype="float32")
    batches = list(
        make_batches(load_samples(spec, max_samples=6, seed=0), processor, max_seq_len=80, batch_size=3, **PIXELS)
    )
    blocks = find_moe_blocks(model)
    if streamed:
        got, _ = observe(run, blocks, batches, mode, 768)
        run.close()
        return got
    observer = Observer(model, blocks, mode, 768)
    with observer, torch.inference_mode():
        for batch in batches:
            observer.set_modality(batch.modality)
            forward(model, batch)
    return observer.export()


@pytest.mark.parametrize("mode", ["full", "routed", "router"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_scores_equal_the_dequantized_twin_in_memory_and_streamed(fmt, mode, quantized):
    qdir, twin = quantized[fmt]
    reference = _statistics(twin, mode, streamed=False)
    _close(reference, _statistics(qdir, mode, streamed=False))
    _close(reference, _statistics(qdir, mode, streamed=True))


def test_qwen3_vl_fp8_release_layout_scores_like_its_twin(tiny_vl_dir, tmp_path):
    """Qwen's FP8 VL builds store experts one by one (experts.{j}.gate_proj.weight + weight_scale_inv), which
    transformers' Qwen3-VL conversions do not read: the reader adds the per-expert converters, in memory and
    streamed, and the vision tower stays unquantized."""
    from reap_vlm.verify import describe

    qdir = quantize_checkpoint(tiny_vl_dir, tmp_path / "fp8", "fp8")
    info = describe(qdir, 0.5)
    assert info["layout"] == ["per-expert"] and info["quantization"]["quantized"] == {"attention": 12, "experts": 72}
    twin = _twin(qdir, tmp_path / "twin")
    reference = _statistics(twin, "full", streamed=False, spec="code:2,vision:4")
    _close(reference, _statistics(qdir, "full", streamed=False, spec="code:2,vision:4"))
    _close(reference, _statistics(qdir, "full", streamed=True, spec="code:2,vision:4"))


def test_reap_stage_records_the_quantization_and_the_pruned_export_is_exact(quantized, tiny_text_dir, tmp_path):
    """Scored on the FP8 export (in memory), the metadata says so; the prune stage prunes the FP8 export with
    it (the exactness oracle against the masked FP8 original) and takes the bf16 original with a note."""
    from test_scoring import _settings

    from reap_vlm.cli import main
    from reap_vlm.prune import run
    from reap_vlm.reap import score

    qdir, _ = quantized["fp8"]
    out = tmp_path / "run"
    meta = score(_settings(qdir, out, num_keep=4))
    recorded = meta["model"]["quantization"]
    assert recorded["format"] == "fp8" and recorded["block_size"] == [16, 16]
    assert recorded["statistics_from"] == "the dequantized weights in float32"
    args = ["--model-path", str(qdir), "--output-path", str(out)]

    def write(_layout, dst):
        assert main("prune", run, [*args, "--pruned-model-path", str(dst)]) == 0
        config = json.loads((dst / "config.json").read_text())
        assert config["quantization_config"]["quant_method"] == "fp8"
        kept = config["reap_pruning"]["kept"]
        return {(int(k.split(".")[0]), k.split(".", 1)[1]): v for k, v in kept.items()}

    batches = [b.inputs for b in _inputs(qdir, with_image=False)]
    _, keep, _ = prune_and_compare(qdir, tmp_path / "pruned", batches, write=write, atol=1e-5)
    assert {f"{layer}.{s}": v for (layer, s), v in keep.items()} == {k: v["kept"] for k, v in meta["layers"].items()}


def test_the_bf16_original_prunes_with_the_quantized_metadata(quantized, tiny_text_dir, tmp_path, capsys):
    from reap_vlm import metadata
    from reap_vlm.loading import quantization_of

    qdir, _ = quantized["ct-int4"]
    layout = inspect_checkpoint(tiny_text_dir)
    quant = quantization_of(qdir, inspect_checkpoint(qdir).config)
    meta = {
        "model": {
            "architecture": "Qwen3MoeForCausalLM",
            "config_sha256": metadata.config_hash(inspect_checkpoint(qdir).config),
            "blocks": [{"layer": layer, "expert_set": "experts", "num_experts": 8} for layer in range(4)],
            "quantization": quant.summary(),
        }
    }
    assert metadata.check_against(meta, layout.config, layout.counts()) == []
    note = metadata.quantized_pair(meta, None, "the original")
    assert note.startswith("the metadata was scored on the compressed-tensors checkpoint and the original is")
    assert "same architecture and expert counts" in note
    assert metadata.quantized_pair(meta, quant) is None
