"""./run.sh verify: layout without weights, on every tiny family; metadata check; bad input."""

from __future__ import annotations

import json

import pytest

from reap_vlm.tiny import FAMILIES, make_tiny
from reap_vlm.verify import main


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_verify_every_tiny_family(family, tmp_path, capsys):
    src = make_tiny(family, tmp_path / family)
    assert main([str(src), "--json", "--prune-ratio", "0.25"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["experts"] == 8 and info["moe_blocks"] >= 2 and info["top_k"] == 2
    assert isinstance(info["routing"], list), info["routing"]
    assert info["after"]["experts_kept"] == 6 and info["after"]["bytes"] < sum(info["bytes"].values())
    if family == "deepseek_v3":
        assert info["n_group"] == 2 and "sigmoid top-2, 2 groups" in info["routing"]
    if family in ("qwen2_moe", "deepseek_v3", "glm4_moe"):
        assert info["shared_experts"]


def test_verify_checks_metadata_and_reports_bad_input(tmp_path, capsys):
    assert main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    src = make_tiny("qwen3_moe", tmp_path / "m")
    meta = {
        "schema_version": 1,
        "model": {
            "architecture": "MixtralForCausalLM",
            "blocks": [{"key": "0.experts", "layer": 0, "expert_set": "experts", "num_experts": 8, "top_k": 2}],
        },
        "scoring": {"mode": "full"},
        "calibration": {},
        "layers": {},
        "plan": {},
    }
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert main([str(src), "--metadata-path", str(tmp_path / "meta.json")]) == 2
    assert "made for MixtralForCausalLM" in capsys.readouterr().err


def test_verify_json_is_one_document_after_a_json_stage_in_the_same_process(tmp_path, capsys):
    """A stage run with --json earlier in the process (the console's result line on) must not add its result
    line to verify's own JSON (the suite runs stages in-process)."""
    from reap_vlm import console

    console.configure("info", True)
    src = make_tiny("mixtral", tmp_path / "m")
    assert main([str(src), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["experts"] == 8
