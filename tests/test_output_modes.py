"""Small output rules: the metadata file gets the same mode as every other output (not mkstemp's 0600), and the
demo never writes into the shipped demo VLM."""

from __future__ import annotations

import os
import shutil

from reap_vlm import demo
from reap_vlm.provenance import write_json_atomic


def test_json_outputs_get_the_umask_mode_not_0600(tmp_path):
    old = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "reap_metadata.json", {"a": 1})
        assert (tmp_path / "reap_metadata.json").stat().st_mode & 0o777 == 0o644
        os.umask(0o027)
        write_json_atomic(tmp_path / "other.json", {"a": 1})
        assert (tmp_path / "other.json").stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_demo_refuses_a_folder_inside_the_shipped_demo_vlm(tmp_path, monkeypatch, capsys):
    shipped = tmp_path / "demo_vlm"
    shutil.copytree(demo.DEMO_VLM, shipped)
    before = sorted(p.name for p in shipped.rglob("*"))
    monkeypatch.setattr(demo, "DEMO_VLM", shipped)
    for target in (shipped / "out", shipped, tmp_path):
        assert demo.main(["--output-path", str(target)]) == 2
        err = capsys.readouterr().err
        assert "overlaps the input" in err and len(err.strip().splitlines()) == 1, err
    assert sorted(p.name for p in shipped.rglob("*")) == before
