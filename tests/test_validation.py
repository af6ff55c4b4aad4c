"""The reading layer (reap_vlm/validate.py and its users), checked directly: each rule against an input that
breaks exactly it, and the same input without the break passing."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import torch

from reap_vlm import metadata
from reap_vlm.checkpoint import inspect_checkpoint, read_header
from reap_vlm.checkpoint.layout import check_config
from reap_vlm.errors import CalibrationError, CheckpointError, MetadataError, SettingsError
from reap_vlm.settings import parse_size
from reap_vlm.validate import MAX_DEPTH, depth, open_regular, parse_json, read_accumulators, read_json


def _shard(path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)
    return path


def test_depth_is_counted_without_recursion():
    assert depth(1) == 0 and depth([]) == 1 and depth({"a": [1, {"b": []}]}) == 4
    assert depth(json.loads("[" * 900 + "]" * 900)) == 900


def test_json_depth_nan_and_encoding_are_refused():
    assert parse_json("[" * MAX_DEPTH + "]" * MAX_DEPTH, "x", CheckpointError, "fix") is not None
    with pytest.raises(CheckpointError, match=f"nests JSON {MAX_DEPTH + 1} levels deep"):
        parse_json("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1), "x", CheckpointError, "fix")
    with pytest.raises(CheckpointError, match="nests JSON too deeply"):
        parse_json("[" * 100_000 + "]" * 100_000, "x", CheckpointError, "fix")
    with pytest.raises(CheckpointError, match="non-standard JSON constant NaN"):
        parse_json('{"a": NaN}', "x", CheckpointError, "fix")
    with pytest.raises(CheckpointError, match="is not UTF-8 text: byte 2 is 0xff"):
        parse_json(b'{"\xff": 1}', "x", CheckpointError, "fix")


def test_only_regular_files_are_opened_and_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "pipe.json"
    os.mkfifo(fifo)
    result = {}

    def attempt():
        try:
            read_json(fifo, MetadataError, "fix", 1 << 20)
        except MetadataError as err:
            result["err"] = str(err)

    worker = threading.Thread(target=attempt, daemon=True)
    worker.start()
    worker.join(10)
    assert not worker.is_alive(), "reading a FIFO blocked"
    assert "is not a regular file: it is a FIFO" in result["err"]
    with pytest.raises(MetadataError, match="it is a character device"):
        open_regular("/dev/null", MetadataError, "fix")
    with pytest.raises(MetadataError, match="it is a directory"):
        open_regular(tmp_path, MetadataError, "fix")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(MetadataError, match="cannot open"):
        open_regular(loop, MetadataError, "fix")
    big = tmp_path / "big.json"
    big.write_text("[" + "0," * 1000 + "0]")
    with pytest.raises(MetadataError, match="more than the 0 MiB"):
        read_json(big, MetadataError, "fix", 1000)


def test_header_bytes_must_match_shape_and_never_overlap(tmp_path):
    f32 = {"dtype": "F32", "shape": [2, 2]}
    ok = _shard(tmp_path / "ok.safetensors", {"a": f32 | {"data_offsets": [0, 16]}}, bytes(16))
    assert read_header(ok)[1] == 8 + len(json.dumps({"a": f32 | {"data_offsets": [0, 16]}}))
    bad = _shard(tmp_path / "bad.safetensors", {"a": f32 | {"data_offsets": [0, 12]}}, bytes(16))
    with pytest.raises(
        CheckpointError, match=r"shape \[2, 2\] of F32, which is 16 bytes, but its data_offsets hold 12"
    ):
        read_header(bad)
    # B lies inside A, C after B but still inside A: found though A and C are not neighbours in offset order
    one = {"dtype": "U8", "shape": [4]}
    nested = {
        "a": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]},
        "b": one | {"data_offsets": [2, 6]},
        "c": one | {"data_offsets": [8, 12]},
    }
    with pytest.raises(CheckpointError, match="tensors a and b share bytes"):
        read_header(_shard(tmp_path / "nested.safetensors", nested, bytes(16)))
    # a sub-byte dtype: 6 F4 values are 3 bytes; zero-size tensors own no bytes
    packed = {
        "q": {"dtype": "F4", "shape": [6], "data_offsets": [0, 3]},
        "e": {"dtype": "F32", "shape": [0], "data_offsets": [3, 3]},
    }
    read_header(_shard(tmp_path / "f4.safetensors", packed, bytes(3)))
    with pytest.raises(CheckpointError, match=r"dtype is 'F5'"):
        read_header(
            _shard(tmp_path / "dt.safetensors", {"a": {"dtype": "F5", "shape": [1], "data_offsets": [0, 1]}}, b"\0")
        )


def test_config_types_and_cross_checks():
    good = {"model_type": "x", "num_experts": 8, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1}
    check_config(good)
    check_config({"text_config": {"num_local_experts": 8, "moe_topk": [2, 2, 2]}})  # one value per layer
    for change, message in [
        ({"num_experts": True}, "num_experts is True"),
        ({"num_experts_per_tok": 2.0}, "num_experts_per_tok is 2.0"),
        ({"num_experts_per_tok": 9}, "top-k is 9 but the model has 8 experts"),
        ({"n_group": 3}, "n_group=3 does not divide the 8 experts"),
        ({"topk_group": 4}, "topk_group=4 exceeds n_group=2"),
        ({"text_config": [1]}, "text_config is not an object"),
        ({"architectures": "Qwen3MoeForCausalLM"}, "architectures is not a list of names"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            check_config(good | change)
    with pytest.raises(CheckpointError, match="moe_topk is"):
        check_config({"num_experts": 8, "moe_topk": [2, 4]})


def test_sizes_parse_with_units_or_are_refused():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("1.5 MiB") == 3 << 19 and parse_size("300") == 300
    for text in ("5XB", "GB", "-1MB", "nanGB", "0"):
        with pytest.raises(SettingsError, match="is not a size"):
            parse_size(text, "REAP_MAX_SHARD_SIZE")


def test_accumulators_must_fit_the_run(tmp_path):
    expected = {"0.experts": {"acc": torch.zeros(8, 7), "tokens": torch.zeros(3)}}
    path = tmp_path / "acc.pt"
    torch.save({"batch": 2, "state": expected, "settings_hash": "h"}, path)
    assert read_accumulators(path, expected, 3, SettingsError)["batch"] == 2
    with pytest.raises(SettingsError, match="is after batch 2: this run has 2"):
        read_accumulators(path, expected, 2, SettingsError)
    with pytest.raises(SettingsError, match="does not fit this model"):
        read_accumulators(path, {"0.experts": {"acc": torch.zeros(4, 7), "tokens": torch.zeros(3)}}, 3, SettingsError)
    torch.save({"batch": True, "state": expected, "settings_hash": "h"}, path)
    with pytest.raises(SettingsError, match="batch is True"):
        read_accumulators(path, expected, 3, SettingsError)


@pytest.fixture(scope="module")
def scored(tiny_text_dir, tmp_path_factory):
    from reap_vlm.reap import score
    from reap_vlm.settings import ReapSettings, load

    out = tmp_path_factory.mktemp("scored")
    args = ["--model-path", str(tiny_text_dir), "--output-path", str(out), "--device", "cpu", "--calibration", "code"]
    score(
        load(
            ReapSettings, [*args, "--max-samples", "4", "--max-seq-len", "32", "--eval-samples", "0", "--no-plots"], {}
        )
    )
    return tiny_text_dir, out / "reap_metadata.json"


def test_metadata_of_the_same_model_with_another_config_is_a_note_other_expert_widths_an_error(scored, tmp_path):
    model, meta_path = scored
    meta = metadata.read(meta_path)
    copy = shutil.copytree(model, tmp_path / "m")
    config = json.loads((copy / "config.json").read_text())
    config["use_cache"] = not config.get("use_cache", True)  # another config hash, the same experts
    (copy / "config.json").write_text(json.dumps(config))
    layout = inspect_checkpoint(copy)
    notes = metadata.check_against(meta, layout.config, layout.counts(), "m", layout.params_per_expert())
    assert notes and "config.json differs" in notes[0]
    for block in meta["model"]["blocks"]:  # the scored model's experts were twice as wide
        block["expert_shapes"] = {k: [v[0], 2 * v[1], *v[2:]] for k, v in block["expert_shapes"].items()}
    with pytest.raises(MetadataError, match="experts have 12288 weights each, this checkpoint's 6144"):
        metadata.check_against(meta, layout.config, layout.counts(), "m", layout.params_per_expert())


def test_metadata_schema_names_the_field(scored):
    _, meta_path = scored
    good = json.loads(meta_path.read_text())
    metadata.validate(good)
    key = next(iter(good["layers"]))
    for change, message in [
        (lambda m: m["layers"][key].update(kept=[0, 0, 1, 2]), "duplicate or out-of-range"),
        (lambda m: m["layers"][key].update(kept=[0, 1, 2, 99]), "duplicate or out-of-range"),
        (lambda m: m["layers"][key]["kept"].__setitem__(0, 1.0), r"kept.0 is 1.0"),
        (lambda m: m["model"]["blocks"][0].update(num_experts="8"), r"num_experts is '8'"),
        (lambda m: m["model"]["blocks"][0].update(top_k=9), "top_k=9 exceeds its 8 experts"),
        (lambda m: m["plan"].update(ratio=1.5), r"plan.ratio is 1.5"),
        (lambda m: m["scoring"].update(mode="fast"), r"scoring.mode is 'fast'"),
        (lambda m: m["layers"].update(extra={}), "layers has an entry 'extra'"),
        (lambda m: m["model"]["blocks"].append(dict(m["model"]["blocks"][0])), "lists a block twice"),
    ]:
        data = json.loads(json.dumps(good))
        change(data)
        with pytest.raises(MetadataError, match=message):
            metadata.validate(data)


def test_jsonl_rows_and_images_are_checked(tmp_path):
    from PIL import Image

    from reap_vlm.calibration import read_source

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    rows = [
        {"text": "plain"},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "text", "text": "q"}]}
            ]
        },
    ]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(read_source(str(good), "calibration")) + len(read_source(str(good), "evaluation")) == 2
    for row, message in [
        ({"text": 5}, "line 1: text is 5"),
        ({"messages": [{"content": [{"type": "text", "text": ["x"]}]}]}, r"messages.0.content.0.text is list"),
        ({"messages": [{"role": 1, "content": "x"}]}, "messages.0.role is 1"),
        ({"messages": "hi"}, "messages is 'hi'"),
    ]:
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps(row) + "\n")
        with pytest.raises(CalibrationError, match=message):
            read_source(str(bad), "calibration") + read_source(str(bad), "evaluation")
