"""Quantized checkpoints (reap_vlm.quantization): detected and reported by verify, dequantized bit for bit as
their producing library does, scored like their dequantized twin in memory and streamed, recorded in the
metadata, and pruned exactly. The tiny quantized checkpoints are made by the formats' own producers
(reap_vlm.tiny.quantize_checkpoint: transformers' Fp8Quantize, compressed-tensors' compressors)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from test_prune import _inputs, prune_and_compare
from test_stream import _close
from torch.utils._python_dispatch import TorchDispatchMode

from reap_vlm.calibration import load_samples, make_batches
from reap_vlm.checkpoint import inspect_checkpoint
from reap_vlm.execution.memory import forward
from reap_vlm.execution.stream import StreamedModel, observe
from reap_vlm.loading import load_model
from reap_vlm.moe import find_moe_blocks
from reap_vlm.observe import Observer
from reap_vlm.quantization import DEQUANTIZED, detect, is_fp8_experts, is_quantized_experts
from reap_vlm.tiny import quantize_checkpoint

FORMATS = ("fp8", "ct-int4", "ct-fp8")
PACKED = ("awq", "awq-swapped", "gptq", "gptq-act-order")  # committed fixtures made by auto-round's packers
LLMCOMPRESSOR = "llmcompressor-w4a16"  # a committed checkpoint written by llm-compressor (see its script)
KEPT_PACKED = ("ct-int4", "ct-fp8", *PACKED, LLMCOMPRESSOR)  # experts kept as stored in memory (PackedExperts)
FIXTURES = Path(__file__).parent / "fixtures" / "quantized"
PIXELS = dict(min_pixels=1024, max_pixels=16384)


@pytest.fixture(scope="module")
def quantized(tiny_text_dir, tmp_path_factory):
    """format -> (quantized checkpoint, its dequantized twin: the same weights as a plain fp32 checkpoint)."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for fmt in FORMATS:
        qdir = quantize_checkpoint(tiny_text_dir, root / fmt, fmt)
        out[fmt] = (qdir, _twin(qdir, root / f"{fmt}-twin"))
    for fmt in PACKED:
        qdir = _packed_checkpoint(tiny_text_dir, root / fmt, fmt)
        out[fmt] = (qdir, _twin(qdir, root / f"{fmt}-twin"))
    qdir = root / LLMCOMPRESSOR
    qdir.mkdir()
    for f in [
        *(FIXTURES / LLMCOMPRESSOR).iterdir(),
        *(tiny_text_dir / n for n in ("tokenizer.json", "tokenizer_config.json")),
    ]:
        (qdir / f.name).write_bytes(f.read_bytes())
    out[LLMCOMPRESSOR] = (qdir, _twin(qdir, root / f"{LLMCOMPRESSOR}-twin"))
    return out


def _swapped(name: str) -> str:
    """experts.{j}.{proj}.{x} -> experts.{proj}.{j}.{x} (the other per-expert order of AWQ exports)."""
    head, _, rest = name.partition(".experts.")
    j, proj, leaf = rest.split(".", 2)
    return f"{head}.experts.{proj}.{j}.{leaf}"


def _packed_checkpoint(tiny_dir: Path, dst: Path, fmt: str) -> Path:
    """The tiny qwen3_moe with its expert weights replaced by a committed AWQ/GPTQ fixture (its source is
    this same tiny checkpoint: the manifest's sha256 of the expert weights is checked)."""
    import hashlib
    import shutil

    from safetensors.torch import save_file

    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    name = fmt.removesuffix("-swapped")
    with safe_open(str(FIXTURES / f"{name}.safetensors"), framework="pt") as f:
        packed = {n: f.get_tensor(n) for n in f.keys() if not n.startswith("ref.")}
    shutil.copytree(tiny_dir, dst, ignore=shutil.ignore_patterns("*.safetensors"))
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    digest, weight_map = hashlib.sha256(), {}
    for shard in sorted(set(index["weight_map"].values())):
        with safe_open(str(tiny_dir / shard), framework="pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        out = {}
        for n, t in sorted(tensors.items()):
            if ".mlp.experts." not in n:
                out[n] = t
                continue
            prefix = n.removesuffix(".weight")
            out.update({k: v for k, v in packed.items() if k.rpartition(".")[0] == prefix})
        if fmt.endswith("-swapped"):
            out = {(_swapped(n) if ".mlp.experts." in n else n): t for n, t in out.items()}
        save_file(out, str(dst / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(out, shard))
    experts = {}
    for shard in sorted(tiny_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            experts.update({n: f.get_tensor(n) for n in f.keys() if ".mlp.experts." in n})
    for n in sorted(experts):
        digest.update(n.encode() + experts[n].contiguous().numpy().tobytes())
    assert digest.hexdigest() == manifest["source"]["experts_sha256"], (
        "the fixtures were made from other expert weights than reap_vlm.tiny's: re-run "
        "tests/fixtures/quantized/make_fixtures.py"
    )
    index["weight_map"] = weight_map
    index_path.write_text(json.dumps(index, indent=1))
    config = json.loads((dst / "config.json").read_text())
    config["quantization_config"] = manifest["quantization_config"][name]
    (dst / "config.json").write_text(json.dumps(config, indent=1))
    return dst


def _twin(qdir: Path, dst: Path) -> Path:
    """The quantized checkpoint's weights, dequantized by the reader, written as a plain checkpoint."""
    from reap_vlm.loading import _load_dequantizing

    config = json.loads((qdir / "config.json").read_text())
    model = _load_dequantizing(qdir, config, "cpu", "float32", False, "")
    model.config.quantization_config = None
    del model.config.quantization_config
    model.save_pretrained(dst, max_shard_size="300KB", save_original_format=False)  # the fused layout it reads
    for f in qdir.iterdir():  # the processor's files
        if f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
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
    _same_bytes_dequantized(qdir, twin)
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


def _same_bytes_dequantized(qdir: Path, twin: Path) -> None:
    """verify's dequantized size (what memory execution holds) equals the fp32 twin's bytes exactly."""
    from reap_vlm.quantization import dequantized_bytes

    layout = inspect_checkpoint(qdir)
    got = dequantized_bytes(layout, detect(layout.config, layout), itemsize=4)
    assert got == sum(t.nbytes for t in inspect_checkpoint(twin).tensors.values())


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


@pytest.mark.parametrize(
    "fmt, expect",
    [
        ("awq", {"format": "awq", "bits": 4, "group_size": 16, "scheme": "gemm"}),
        ("awq-swapped", {"format": "awq", "bits": 4, "group_size": 16, "scheme": "gemm"}),
        ("gptq", {"format": "gptq", "bits": 4, "group_size": 16, "scheme": "in-order"}),
        ("gptq-act-order", {"format": "gptq", "bits": 4, "group_size": 16, "scheme": "act-order"}),
    ],
)
def test_awq_and_gptq_dequantize_as_the_packer_library_does(fmt, expect, quantized):
    """The reader's weights of the auto-round-packed fixtures equal the library's own dequantization bit for
    bit (AWQ through compressed-tensors' AutoAWQConverter and decompressor; GPTQ by the unpacker here); the
    per-expert names in either order read the same."""
    from reap_vlm.verify import describe

    qdir, _ = quantized[fmt]
    info = describe(qdir, 0.5)["quantization"]
    assert {k: info[k] for k in expect} == expect
    assert info["quantized"] == {"experts": 96} and info["quantized_kinds"] == "experts only"
    _same_bytes_dequantized(qdir, quantized[fmt][1])
    with safe_open(str(FIXTURES / f"{fmt.removesuffix('-swapped')}.safetensors"), framework="pt") as f:
        refs = {n.removeprefix("ref."): f.get_tensor(n) for n in f.keys() if n.startswith("ref.")}
    assert len(refs) == (16 if fmt == "gptq-act-order" else 24)  # layer 0 (act-order: gate/up, see the script)
    streamed = StreamedModel(qdir, device="cpu", dtype="float32")
    reader = streamed.reader
    assert reader.unused == []
    checked = 0
    for name, parts in reader.parts.items():
        if name not in refs:
            continue
        tensors = {}
        for p in parts:
            with safe_open(str(qdir / reader.layout.tensors[p].shard), framework="pt") as f:
                tensors[p] = f.get_tensor(p)
        got = reader.dequantizer.weight(tensors)
        assert got.dtype == torch.float16 and torch.equal(got, refs[name]), name
        checked += 1
    assert checked == len(refs)
    streamed.close()


def test_llm_compressor_export_dequantizes_as_compressed_tensors_does(quantized):
    """A checkpoint written by llm-compressor itself (W4A16 on the linearized experts and attention): detected,
    and every weight equals compressed-tensors' own dequantization of the file."""
    from reap_vlm.verify import describe

    qdir, _ = quantized[LLMCOMPRESSOR]
    info = describe(qdir, 0.5)["quantization"]
    assert info["format"] == "compressed-tensors" and info["scheme"] == "pack-quantized"
    assert info["bits"] == 4 and info["group_size"] == 16
    assert info["quantized"] == {"experts": 96, "attention": 16}
    expected = _library_dequantized(qdir, "ct-int4")
    streamed = StreamedModel(qdir, device="cpu", dtype="float32")
    reader = streamed.reader
    quantized_names = [n for n, parts in reader.parts.items() if len(parts) > 1]
    assert len(quantized_names) == 112
    for name in quantized_names:
        with safe_open(str(qdir / reader.layout.tensors[reader.parts[name][0]].shard), framework="pt") as f:
            tensors = {p: f.get_tensor(p) for p in reader.parts[name]}
        assert torch.equal(reader.dequantizer.weight(tensors).float(), expected[name]), name
    streamed.close()


def _statistics(
    model_dir: Path,
    mode: str,
    streamed: bool,
    spec: str = "code:3,writing:3",
    keep_fp8_experts: bool = False,
    budget_mb: float = 768,
    merge: bool = False,
    keep_packed_experts: bool = False,
) -> dict:
    """The observer's statistics (and with `merge`, the merge statistics' tensors under "merge")."""
    from reap_vlm.observe.merge_stats import MergeStats

    if streamed:
        run = StreamedModel(model_dir, device="cpu", dtype="float32")
        model, processor = run.model, run.processor
    else:
        model, processor, _ = load_model(
            model_dir,
            device="cpu",
            dtype="float32",
            keep_fp8_experts=keep_fp8_experts,
            keep_packed_experts=keep_packed_experts,
        )
    batches = list(
        make_batches(load_samples(spec, max_samples=6, seed=0), processor, max_seq_len=80, batch_size=3, **PIXELS)
    )
    blocks = find_moe_blocks(model)
    if keep_fp8_experts:  # transformers' FP8Experts holding the checkpoint's e4m3 experts
        assert all(is_fp8_experts(model.get_submodule(b.experts)) for b in blocks)
    if keep_packed_experts:  # PackedExperts holding the checkpoint's experts as stored
        kept = [model.get_submodule(b.experts) for b in blocks]
        assert all(is_quantized_experts(m) and not is_fp8_experts(m) for m in kept)
    if streamed:
        got, _ = observe(run, blocks, batches, mode, 768)
        run.close()
        return got
    collector = MergeStats(blocks, 64, 32, 0) if merge else None
    observer = Observer(model, blocks, mode, budget_mb, merge=collector)
    with observer, torch.inference_mode():
        for batch in batches:
            observer.set_modality(batch.modality)
            forward(model, batch)
    out = observer.export()
    if merge:
        out["merge"] = {k: v.flatten().tolist() for k, v in collector.tensors().items()}
    return out


@pytest.mark.parametrize(
    "fmt, mode",
    [
        pytest.param(f, m, marks=() if m == "full" or f == "fp8" else pytest.mark.slow)
        for f in (*FORMATS, *PACKED, LLMCOMPRESSOR)
        for m in ("full", "routed", "router")
    ],
)
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
    _close(reference, _statistics(qdir, "full", streamed=False, spec="code:2,vision:4", keep_fp8_experts=True))


@pytest.mark.parametrize("mode", ["full", "routed", "router"])
def test_fp8_experts_kept_in_memory_score_like_the_dequantized_model(mode, quantized):
    """The experts stay e4m3 in transformers' FP8Experts (what a GPU load does): routed and router modes run
    their forward (here, without transformers' FP8 kernels, the chunk-by-chunk dequantizing one), full mode
    dequantizes the experts chunk by chunk; the statistics equal those of the model transformers' FP8 loader
    dequantized whole, within 1e-5 relative."""
    from reap_vlm.reap import _quantization

    qdir, _ = quantized["fp8"]
    reference = _statistics(qdir, mode, streamed=False)
    model, _, config = load_model(qdir, device="cpu", dtype="float32")
    assert not any(is_fp8_experts(m) for m in model.modules())  # the reference is the dequantized model
    _close(reference, _statistics(qdir, mode, streamed=False, keep_fp8_experts=True))
    if mode == "full":  # what the metadata says about it
        kept, _, _ = load_model(qdir, device="cpu", dtype="float32", keep_fp8_experts=True)
        assert _quantization(qdir, config, kept)["statistics_from"] == (
            "the dequantized weights in float32; the experts kept in FP8, dequantized chunk by chunk; the "
            "experts' forward dequantized"
        )


def test_fp8_experts_kept_dequantize_within_the_chunk_budget(quantized):
    """Full mode with merge statistics under a chunk budget of 0.2 MiB: the dequantized expert weights alive at
    once (counted by quantization.DEQUANTIZED) stay within the budget, in many chunks, and the statistics and
    merge statistics still equal the dequantized model's at the default budget. (Below 0.2 MiB the Gram pass's
    chunks change the merge sums' order: one entry that nearly cancels, -1.63e-7, then differs by 1.5e-4
    relative; that was so before the dequantization wrote in place too.)"""
    qdir, _ = quantized["fp8"]
    reference = _statistics(qdir, "full", streamed=False, merge=True)
    budget = 0.2
    DEQUANTIZED.reset()
    got = _statistics(qdir, "full", streamed=False, keep_fp8_experts=True, budget_mb=budget, merge=True)
    _close(reference, got)
    layer = 8 * (64 * 64 + 64 * 32) * 4  # one layer's experts in fp32: gate_up [8, 64, 64], down [8, 64, 32]
    assert 0 < DEQUANTIZED.peak <= budget * 2**20
    assert DEQUANTIZED.largest <= layer
    # per batch and layer at least the Gram norms' 8 single experts (which the routed pairs share), 2 batches,
    # 4 layers
    assert DEQUANTIZED.chunks >= 2 * 4 * 8
    assert DEQUANTIZED.live == 0  # every chunk was freed
    # where the whole layer fits the budget, full mode dequantizes it once per batch (the routed pairs'
    # outputs come from the Gram pass's chunk): 2 batches x 4 layers
    DEQUANTIZED.reset()
    _statistics(qdir, "full", streamed=False, keep_fp8_experts=True)
    assert DEQUANTIZED.chunks == 2 * 4 and DEQUANTIZED.largest == layer


@pytest.mark.parametrize("fmt", KEPT_PACKED)
def test_packed_experts_dequantize_chunk_by_chunk_as_the_whole_load(fmt, quantized):
    """Experts kept as stored (PackedExperts: compressed-tensors, AWQ in both name orders, GPTQ in-order and
    act-order, llm-compressor's export): every chunk of experts that ExpertWeights.experts dequantizes equals
    bit for bit the weights the whole-model load dequantized (whole layer, and expert by expert, twice: the
    stored parts are not changed by dequantizing), the memory holds the stored bytes, not the dense ones, and
    every other weight is the whole load's."""
    from reap_vlm.moe import expert_weights

    qdir, _ = quantized[fmt]
    whole, _, _ = load_model(qdir, device="cpu", dtype="float32")
    packed, _, _ = load_model(qdir, device="cpu", dtype="float32", keep_packed_experts=True)
    blocks = find_moe_blocks(packed)
    assert [b.key for b in blocks] == [b.key for b in find_moe_blocks(whole)] and len(blocks) == 4
    for b in blocks:
        experts = packed.get_submodule(b.experts)
        assert is_quantized_experts(experts) and not is_fp8_experts(experts)
        assert list(experts.parameters()) == [] and not any(t.is_meta for t in experts.buffers())
        stored = sum(t.numel() * t.element_size() for t in experts.buffers())
        w, ref = expert_weights(experts), expert_weights(whole.get_submodule(b.experts))
        dense = sum(t.numel() * t.element_size() for t in (ref.gate, ref.up, ref.down))
        assert stored < dense / 2  # 4 or 8 bits (+ scales) instead of fp32
        assert w.num_experts == ref.num_experts == 8 and w.up.shape == ref.up.shape and w.down.shape == ref.down.shape
        for _ in range(2):
            chunk = w.experts(0, 8)
            for k in ("gate", "up", "down"):
                assert torch.equal(getattr(chunk, k), getattr(ref, k)), (b.key, k)
            for e in range(8):
                one = w.experts(e, e + 1)
                assert all(torch.equal(getattr(one, k)[0], getattr(ref, k)[e]) for k in ("gate", "up", "down"))
    others = {n: t for n, t in whole.named_parameters() if ".experts." not in n}
    assert dict(packed.named_parameters()).keys() == others.keys()
    assert all(torch.equal(t, packed.get_parameter(n)) for n, t in others.items())


class _LiveBytes(TorchDispatchMode):
    """The bytes of the tensors that ops make while it is active, alive at once at most (`peak`)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_leaves

        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.untyped_storage().nbytes() == 0:
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() in self._seen:  # a view of a tensor already counted
                continue
            self._seen.add(storage.data_ptr())
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, storage.nbytes(), storage.data_ptr())
        return out

    def _free(self, n: int, ptr: int) -> None:
        self.live -= n
        self._seen.discard(ptr)


@pytest.mark.parametrize("fmt", KEPT_PACKED)
def test_packed_experts_dequantization_temporaries_within_their_allowance(fmt, quantized):
    """The chunk budget counts, per expert, its dense weights and DEQUANTIZE_TEMPORARY_BYTES per weight of one
    projection for the projection being dequantized: every tensor the format's dequantization makes for one
    projection (its result included), alive at once, stays within that allowance."""
    from reap_vlm.quantization import DEQUANTIZE_TEMPORARY_BYTES, PROJECTIONS

    qdir, _ = quantized[fmt]
    model, _, _ = load_model(qdir, device="cpu", dtype="float32", keep_packed_experts=True)
    experts = model.get_submodule(find_moe_blocks(model)[0].experts)
    for proj in PROJECTIONS:
        live = _LiveBytes()
        with live:
            weight = experts.weight(3, proj)
        assert 0 < live.peak <= DEQUANTIZE_TEMPORARY_BYTES * weight.numel(), (proj, live.peak / weight.numel())


@pytest.mark.parametrize(
    "fmt, mode",
    [
        pytest.param(f, m, marks=() if m == "full" or f == "ct-int4" else pytest.mark.slow)
        for f in KEPT_PACKED
        for m in ("full", "routed", "router")
    ],
)
def test_packed_experts_kept_in_memory_score_like_the_dequantized_model(fmt, mode, quantized):
    """Routed and router modes run PackedExperts' dequantizing forward, full mode dequantizes chunk by chunk:
    the statistics equal the whole-load dequantized model's within 1e-5 relative."""
    from reap_vlm.reap import _quantization

    qdir, _ = quantized[fmt]
    reference = _statistics(qdir, mode, streamed=False)
    _close(reference, _statistics(qdir, mode, streamed=False, keep_packed_experts=True))
    if mode == "full":  # what the metadata says about it
        kept, _, config = load_model(qdir, device="cpu", dtype="float32", keep_packed_experts=True)
        fmt_name = detect(config, inspect_checkpoint(qdir)).format
        assert _quantization(qdir, config, kept)["statistics_from"] == (
            f"the dequantized weights in float32; the experts kept as stored ({fmt_name}), dequantized chunk by "
            "chunk, also in their forward"
        )


def test_qwen3_vl_int4_experts_kept_as_stored_score_like_the_whole_load(tiny_vl_dir, tmp_path):
    """Qwen3-VL's layout (the reader's added per-expert conversions, images in the batches): int4 experts kept
    as stored score like the whole-load dequantized model in full mode, and the vision tower stays plain."""
    qdir = quantize_checkpoint(tiny_vl_dir, tmp_path / "ct-int4", "ct-int4")
    reference = _statistics(qdir, "full", streamed=False, spec="code:2,vision:4")
    _close(reference, _statistics(qdir, "full", streamed=False, spec="code:2,vision:4", keep_packed_experts=True))


def test_experts_partly_quantized_are_all_dequantized_at_load(tiny_text_dir, tmp_path):
    """A checkpoint whose experts are quantized in some layers only: the experts modules share the config that
    selects their forward, so none is kept as stored: the model is the whole load's, weight for weight."""
    qdir = quantize_checkpoint(tiny_text_dir, tmp_path / "partial", "ct-int4", parts=("layers.1.mlp.experts.",))
    assert detect(inspect_checkpoint(qdir).config, inspect_checkpoint(qdir)).modules == {"experts": 24}
    model, _, _ = load_model(qdir, device="cpu", dtype="float32", keep_packed_experts=True)
    assert not any(is_quantized_experts(m) for m in model.modules())
    whole, _, _ = load_model(qdir, device="cpu", dtype="float32")
    params = dict(whole.named_parameters())
    assert dict(model.named_parameters()).keys() == params.keys()
    assert all(torch.equal(t, params[n]) for n, t in model.named_parameters())


@pytest.mark.parametrize("fmt", ["ct-int4", "gptq-act-order"])
def test_packed_experts_dequantize_within_the_chunk_budget(fmt, quantized):
    """Full mode with merge statistics under a chunk budget of a quarter MiB on experts kept as stored: the
    dequantized expert weights alive at once (quantization.DEQUANTIZED) stay within the budget and below one
    layer's, in many chunks, every chunk is freed, and the statistics and merge statistics equal the whole-load
    model's; at the default budget each layer is dequantized once per batch."""
    qdir, _ = quantized[fmt]
    reference = _statistics(qdir, "full", streamed=False, merge=True)
    budget = 0.25
    DEQUANTIZED.reset()
    got = _statistics(qdir, "full", streamed=False, keep_packed_experts=True, budget_mb=budget, merge=True)
    _close(reference, got)
    layer = 8 * (64 * 64 + 64 * 32) * 4  # one layer's experts in fp32: gate_up [8, 64, 64], down [8, 64, 32]
    assert 0 < DEQUANTIZED.peak <= budget * 2**20
    # 3 of the 8 experts at most: an expert counts 64 * 32 * (3 * 4 + 24) bytes (its weights, and the
    # temporaries of one projection being dequantized), 3 of them fit a quarter MiB (the merge statistics'
    # chunks; the Gram pass's, which share the budget with per-token intermediates, are single experts)
    assert DEQUANTIZED.largest <= 3 * layer // 8 < layer
    assert DEQUANTIZED.chunks >= 2 * 4 * 8  # per batch and layer at least the Gram pass's 8 single experts
    assert DEQUANTIZED.live == 0
    DEQUANTIZED.reset()
    _statistics(qdir, "full", streamed=False, keep_packed_experts=True)
    assert DEQUANTIZED.chunks == 2 * 4 and DEQUANTIZED.largest == layer


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


@pytest.mark.parametrize(
    "fmt, kept", [("fp8", "the experts kept in FP8"), ("ct-int4", "the experts kept as stored (compressed-tensors)")]
)
def test_reap_stage_with_experts_kept_quantized_measures_the_prune_candidates(
    fmt, kept, quantized, tmp_path, monkeypatch, capsys
):
    """The reap stage on a checkpoint whose experts stay quantized (FP8, or compressed-tensors int4 as
    stored: a GPU's default; forced here on the CPU): merge candidates cannot be written into quantized
    weights, so they are left out with a note, the prune candidates are measured, and the metadata says how
    the statistics were computed."""
    from test_scoring import _settings

    import reap_vlm.reap as reap_stage

    qdir, _ = quantized[fmt]
    real = reap_stage.load_model

    def load(*a, **k):
        return real(*a, **k, keep_fp8_experts=True, keep_packed_experts=True)

    monkeypatch.setattr(reap_stage, "load_model", load)
    meta = reap_stage.score(_settings(qdir, tmp_path / "run", eval_samples=6, num_keep=4))
    assert "merge candidates are not measured" in capsys.readouterr().err
    rows = meta["candidates"]["rows"]
    assert rows and all(r["policy"] != "merge" for r in rows)
    assert kept in meta["model"]["quantization"]["statistics_from"]
    assert (tmp_path / "run" / "reap_merge_stats.safetensors").is_file()  # the prune stage can still merge


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fp8_dequantization_in_place_equals_transformers_op_bit_for_bit(dtype):
    """quantization.dequantize_fp8 (the weights cast into the output, then multiplied by their block scales in
    place) gives transformers' Fp8Dequantize bit for bit: every finite e4m3 bit pattern (subnormals, both
    zeros, the largest), scales from 1e-30 to 1e4, experts stacked and a single matrix, into a given buffer
    or a new one; a grid the fast path does not take (bf16 scales) falls back to the op itself."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from reap_vlm.quantization import dequantize_fp8

    g = torch.Generator().manual_seed(0)
    bits = torch.randint(0, 256, (3, 64, 96), dtype=torch.uint8, generator=g)
    bits[(bits & 0x7F) == 0x7F] = 0  # e4m3fn's NaNs (never equal to themselves)
    finite = torch.arange(127, dtype=torch.uint8)  # every positive finite pattern, and every negative one
    bits[0, :3].view(-1)[: 2 * 127] = torch.cat([finite, finite | 0x80])
    weight = bits.view(torch.float8_e4m3fn)
    scales = 10 ** (torch.rand((3, 4, 3), generator=g) * 34 - 30)  # blocks [16, 32]
    reference = Fp8Dequantize(None)._dequantize_one
    for w, s in ((weight, scales), (weight[1], scales[1])):
        expect = reference(w, s, output_dtype=dtype)
        got = dequantize_fp8(w, s, dtype)
        assert got.dtype == dtype and torch.equal(got.view(torch.uint8), expect.view(torch.uint8))
        buffer = torch.full(w.shape, 7.0, dtype=dtype)
        assert dequantize_fp8(w, s, dtype, out=buffer) is buffer
        assert torch.equal(buffer.view(torch.uint8), expect.view(torch.uint8))
    s16 = scales.to(torch.bfloat16)
    expect = reference(weight, s16, output_dtype=dtype)
    assert torch.equal(dequantize_fp8(weight, s16, dtype).view(torch.uint8), expect.view(torch.uint8))


def test_fp8_one_pass_kernel_equals_transformers_op_bit_for_bit(tmp_path):
    """reap_vlm.fp8_triton (the CUDA path of dequantize_fp8), run by Triton's interpreter on the CPU: every
    finite e4m3 pattern, scales from 1e-30 to 1e4, experts stacked and one matrix, a row count that does not
    fill the last tile, bf16 (rounded to nearest even in integers) and fp32: Fp8Dequantize's bits."""
    import subprocess
    import sys

    script = tmp_path / "check.py"
    script.write_text(
        "import torch\n"
        "from transformers.integrations.finegrained_fp8 import Fp8Dequantize\n"
        "from reap_vlm.fp8_triton import dequantize_into\n"
        "g = torch.Generator().manual_seed(0)\n"
        "bits = torch.randint(0, 256, (3, 36, 96), dtype=torch.uint8, generator=g)\n"
        "bits[(bits & 0x7F) == 0x7F] = 0\n"
        "finite = torch.arange(127, dtype=torch.uint8)\n"
        "bits[0, :3].view(-1)[: 2 * 127] = torch.cat([finite, finite | 0x80])\n"
        "w = bits.view(torch.float8_e4m3fn)\n"
        "s = 10 ** (torch.rand((3, 3, 3), generator=g) * 34 - 30)\n"  # blocks [12, 32]
        "for a, b in ((w, s), (w[2], s[2])):\n"
        "    for dt in (torch.bfloat16, torch.float32):\n"
        "        ref = Fp8Dequantize(None)._dequantize_one(a, b, output_dtype=dt)\n"
        "        got = dequantize_into(a, b, torch.empty(a.shape, dtype=dt))\n"
        "        assert torch.equal(got.view(torch.uint8), ref.view(torch.uint8)), dt\n"
        "print('ok')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "ok", done.stderr[-2000:]


def test_fp8_dequantization_without_an_exact_kernel_takes_the_torch_path(monkeypatch):
    """dequantize_fp8 uses the one-pass kernel only where it was checked bit for bit on that device: a
    check that failed (here: forced) leaves the torch path, with the same bits."""
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    from reap_vlm import quantization

    w = (torch.randn(2, 32, 64) * 50).to(torch.float8_e4m3fn)
    s = torch.rand(2, 2, 2) + 0.01
    assert not quantization._triton_exact(w, s, torch.bfloat16)  # a CPU tensor: never the kernel
    monkeypatch.setattr(quantization, "_triton_exact", lambda *a: False)
    ref = Fp8Dequantize(None)._dequantize_one(w, s, output_dtype=torch.bfloat16)
    assert torch.equal(quantization.dequantize_fp8(w, s, torch.bfloat16).view(torch.uint8), ref.view(torch.uint8))
