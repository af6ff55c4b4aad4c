"""Calibration honesty: how a user's data is split into calibration and held-out samples (printed, recorded,
configurable with REAP_EVAL_DATA), and the chat-template policy (REAP_CHAT_TEMPLATE)."""

from __future__ import annotations

import json

from reap_vlm.calibration import make_batches, read_source


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_split_all_reads_every_row_of_a_user_file_and_only_calibration_of_a_builtin_set(tmp_path):
    path = _jsonl(tmp_path / "mine.jsonl", [{"text": f"sample number {i} of the user's data"} for i in range(40)])
    calib, held, every = (read_source(str(path), split) for split in ("calibration", "evaluation", "all"))
    assert len(calib) + len(held) == len(every) == 40 and 0 < len(held) < 20
    assert {s.text for s in every} == {s.text for s in calib} | {s.text for s in held}
    assert not {s.text for s in calib} & {s.text for s in held}
    assert all(s.plain for s in every)
    assert [s.text for s in read_source("code", "all")] == [s.text for s in read_source("code", "calibration")]


def test_chat_template_auto_keeps_plain_text_plain_and_messages_templated(tiny_vl_dir, tmp_path):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_vl_dir)
    tok = processor.tokenizer
    prose = "The quick brown fox jumps over the lazy dog."
    path = _jsonl(tmp_path / "mine.jsonl", [{"text": prose}, {"messages": [{"role": "user", "content": "Hi there"}]}])
    samples = sorted(read_source(str(path), "all"), key=lambda s: s.plain)  # the messages row first
    assert [s.plain for s in samples] == [False, True]

    def ids(policy):
        (batch,) = make_batches(samples, processor, max_seq_len=128, batch_size=2, chat_template=policy)
        mask = batch.inputs["attention_mask"].bool()
        return [row[m].tolist() for row, m in zip(batch.inputs["input_ids"], mask, strict=True)]

    auto, always = ids("auto"), ids("always")
    templated = processor.apply_chat_template(samples[0].messages, tokenize=False, add_generation_prompt=False)
    assert auto[0] == always[0] == tok(templated, add_special_tokens=False)["input_ids"]  # messages: the template
    assert auto[1] == tok(prose)["input_ids"]  # plain text stays plain text
    wrapped = processor.apply_chat_template(samples[1].messages, tokenize=False, add_generation_prompt=False)
    assert always[1] == tok(wrapped, add_special_tokens=False)["input_ids"] != auto[1]  # as a fake user turn


def test_reap_prints_and_records_the_split_and_the_policy(tiny_text_dir, tmp_path, capsys):
    from reap_vlm.reap import score
    from reap_vlm.settings import ReapSettings, load

    mine = _jsonl(tmp_path / "mine.jsonl", [{"text": f"line {i}: " + "words of text " * 8} for i in range(30)])
    assert read_source(str(mine), "selection")  # this file's hash split leaves rows for the plans
    other = _jsonl(tmp_path / "held.jsonl", [{"text": f"held-out {i}: " + "other text " * 8} for i in range(6)])
    base = ["--model-path", str(tiny_text_dir), "--device", "cpu", "--max-samples", "30", "--max-seq-len", "48"]
    base += ["--calibration", str(mine), "--no-plots", "--eval-samples", "6", "--eval-ratios", "", "--merge-stats-mb"]
    base += ["0", "--scoring-mode", "router", "--chat-template", "auto"]

    meta = score(load(ReapSettings, [*base, "--output-path", str(tmp_path / "a")], {}))
    split = meta["calibration"]["split"][str(mine)]
    selection = read_source(str(mine), "selection")  # the plan-selection portion of the 1-in-5 held-out rows
    assert (
        split["calibration"]
        == len(read_source(str(mine), "calibration"))
        == 30 - len(read_source(str(mine), "evaluation"))
    )
    assert split["heldout"] == min(len(selection), 4) > 0  # REAP_EVAL_PER_SOURCE: 4 per source without answers
    assert "content hash: 1 row in 5 held out" in split["rule"] and meta["calibration"]["chat_template"] == "auto"
    err = capsys.readouterr().err
    assert "data split (calibration | held-out for the candidate plans; chat template: auto)" in err
    assert f"{split['calibration']:5d} | {split['heldout']:<5d}" in err

    # REAP_EVAL_DATA: the plans are measured on that file, and the calibration file is scored whole
    meta = score(load(ReapSettings, [*base, "--output-path", str(tmp_path / "b"), "--eval-data", str(other)], {}))
    split = meta["calibration"]["split"]
    assert split[str(mine)] == {"calibration": 30, "heldout": 0, "rule": split[str(mine)]["rule"]}
    assert split[str(other)]["heldout"] == 6 and split[str(other)]["calibration"] == 0
    assert meta["calibration"]["eval_data"] == str(other) and "every row scored" in split[str(mine)]["rule"]
