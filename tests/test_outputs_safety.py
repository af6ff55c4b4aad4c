"""Outputs are the tool's own: never written into, over or around a model, the metadata or the home folder;
only folders carrying the tool's marker are replaced; one run per target (a lock); a killed run's leftovers
are resolved by the next run (the finished output is never lost); reap leaves no file on failure; the exit
codes are as documented (3: a bug, with traceback; 130 / 143: interrupted); custom model code never runs
behind a prompt. The one-command cases are in tests/test_reliability.py; these need several steps."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reap_vlm import outputs
from reap_vlm.checkpoint import inspect_checkpoint, plan_prune, write_pruned
from reap_vlm.errors import OutputError, SettingsError, UnsupportedModelError
from reap_vlm.loading import remote_code
from reap_vlm.settings import PruneSettings, load

ROOT = Path(__file__).resolve().parents[1]
BASE = ["--device", "cpu", "--max-samples", "8", "--max-seq-len", "64", "--eval-samples", "0"]


def _digest(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    return {**env, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


# A child that patches one function (the fault) and then runs a stage through the real CLI.
CHILD = """
import sys, time
stage, fault = sys.argv[1], sys.argv[2]
if fault == "slow-copy":
    import reap_vlm.checkpoint.write as w
    original = w._copy_range
    def slow(*a):
        time.sleep(0.05)
        return original(*a)
    w._copy_range = slow
elif fault == "disk-full-at-plots":
    import errno, reap_vlm.report as r
    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(a[1]))
    r.heatmap_png = full
elif fault == "kill-between-renames":
    import os, signal
    import reap_vlm.outputs as o
    rename, calls = os.rename, []
    def rename_then_die(a, b):
        calls.append(a)
        if ".reap-tmp-" in str(a) and any(".reap-old-" not in str(c) and ".reap-tmp-" not in str(c) for c in calls):
            os.kill(os.getpid(), signal.SIGKILL)  # the earlier output is aside, the new one not yet in place
        return rename(a, b)
    o.os.rename = rename_then_die
elif fault in ("zero-division", "bug-error"):
    import reap_vlm.prune as p
    from reap_vlm.errors import BugError
    def broken(*a, **k):
        if fault == "bug-error":
            raise BugError("an invariant broke")
        return 1 / 0
    p.plan_prune = broken
from reap_vlm.cli import main
from reap_vlm.prune import run as prune_run
from reap_vlm.reap import run as reap_run
print("started", flush=True)
sys.exit(main(stage, {"reap": reap_run, "prune": prune_run}[stage], sys.argv[3:]))
"""


def _child(stage: str, fault: str, *args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, stage, fault, *args],
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny model and a metadata file for it, made once."""
    from reap_vlm.reap import score
    from reap_vlm.settings import ReapSettings
    from reap_vlm.tiny import make_tiny

    base = tmp_path_factory.mktemp("safety")
    model = make_tiny("qwen3_moe", base / "model")
    score(load(ReapSettings, ["--model-path", str(model), "--output-path", str(base / "meta"), *BASE], {}))
    return model, base / "meta" / "reap_metadata.json"


def _prune_args(model: Path, meta: Path, out: Path, *extra: str) -> list[str]:
    return ["--model-path", str(model), "--metadata-path", str(meta), "--pruned-model-path", str(out), *extra]


# ---- the guard -------------------------------------------------------------------------------------------------


def test_guard_refuses_every_place_that_is_not_an_own_output(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    guard = dict(what="output", setting="X", models=[model], files=[tmp_path / "runs" / "reap_metadata.json"])
    for target, message in [
        (model, "overlaps the input"),  # the model itself
        (model / "pruned", "overlaps the input"),  # inside it
        (tmp_path, "overlaps the input"),  # above it
        (tmp_path / "runs", "holds .*reap_metadata.json, which this run reads"),
        (home, "is the home folder"),
        (Path("/"), "overlaps the input|is the root folder"),
    ]:
        with pytest.raises(OutputError, match=message):
            outputs.guard_dir(target, **guard, replace=True)
    with pytest.raises(OutputError, match="would be written into the home folder"):
        outputs.guard_file(home / "reap_metadata.json", what="metadata path", setting="X")
    with pytest.raises(OutputError, match="is inside the model folder"):
        outputs.guard_file(model / "sub" / "reap_metadata.json", what="metadata path", setting="X", models=[model])
    outputs.guard_file(home / "runs" / "reap_metadata.json", what="metadata path", setting="X", models=[model])
    outputs.guard_dir(home / "new", **guard)  # a new folder inside the home folder is fine


def test_a_target_that_appears_meanwhile_is_never_replaced(tmp_path):
    tmp, target = tmp_path / ".out.reap-tmp-1", tmp_path / "out"
    tmp.mkdir()
    outputs.write_marker(tmp, "test")
    target.mkdir()  # empty: a plain rename(2) would silently replace it
    with pytest.raises(OutputError, match="appeared while this run was writing"):
        outputs.put_in_place(tmp, target, "output", replace=False)
    (target / "user.txt").write_text("mine")
    for replace in (False, True):  # not an own output: not even --overwrite replaces it
        with pytest.raises(OutputError, match="appeared while this run was writing"):
            outputs.put_in_place(tmp, target, "output", replace=replace)
    assert (target / "user.txt").read_text() == "mine" and (tmp / outputs.MARKER).is_file()


# ---- data loss ---------------------------------------------------------------------------------------------------


def test_overwrite_replaces_only_own_outputs_and_keeps_the_metadata(world, tmp_path):
    model, meta = world
    runs = tmp_path / "runs"
    runs.mkdir()
    shutil.copy(meta, runs / "reap_metadata.json")
    (runs / "notes.txt").write_text("mine")
    before = _digest(runs)
    layout = inspect_checkpoint(model)
    keep = {k: [0, 2, 3, 5, 7] for k in layout.counts()}
    plan = plan_prune(layout, keep)
    with pytest.raises(OutputError, match=r"holds .*reap_metadata\.json, which this run reads"):
        write_pruned(plan, runs, overwrite=True, metadata=runs / "reap_metadata.json")
    with pytest.raises(OutputError, match=r"no \.reap-vlm-output marker"):
        write_pruned(plan, runs, overwrite=True)
    assert _digest(runs) == before


def test_pruning_a_pruned_checkpoint_writes_a_fresh_marker(world, tmp_path):
    model, _ = world
    layout = inspect_checkpoint(model)
    write_pruned(plan_prune(layout, {k: [0, 2, 3, 5, 7] for k in layout.counts()}), tmp_path / "a")
    again = inspect_checkpoint(tmp_path / "a")
    write_pruned(plan_prune(again, {k: [0, 1, 2, 3] for k in again.counts()}), tmp_path / "b")
    assert outputs.is_own(tmp_path / "b") and inspect_checkpoint(tmp_path / "b").num_experts == 4


# ---- locking -----------------------------------------------------------------------------------------------------


def test_a_second_prune_on_the_same_target_fails_fast(world, tmp_path):
    model, meta = world
    out = tmp_path / "out"
    first = _child("prune", "slow-copy", *_prune_args(model, meta, out), cwd=tmp_path)
    assert first.stdout.readline().strip() == "started"
    deadline = time.monotonic() + 60
    while not outputs.lock_path(out).exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    second = subprocess.run(
        [sys.executable, str(ROOT / "prune_model.py"), *_prune_args(model, meta, out, "--overwrite")],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    waited = time.monotonic() - started
    _, first_err = first.communicate(timeout=300)
    assert second.returncode == 2, second.stderr
    (line,) = _errors(second.stderr)
    assert f"another reap-vlm run (pid {first.pid}) is writing {out}" in line and "Traceback" not in second.stderr
    assert waited < 30  # it did not wait for the first run
    assert first.returncode == 0, first_err  # the first run is not disturbed and finishes
    assert inspect_checkpoint(out).num_experts == 4 and not outputs.lock_path(out).exists()


@pytest.mark.parametrize("stage", ["reap", "prune", "test"])
def test_every_stage_refuses_a_target_another_run_holds(world, tmp_path, stage):
    """Each stage takes its target's lock before any work: a held lock is one line at once."""
    from reap_vlm import evaluate, prune, reap
    from reap_vlm.settings import ReapSettings, TestSettings

    model, meta = world
    out = tmp_path / "outputs"
    common = ["--model-path", str(model), "--output-path", str(out)]
    settings, run, target = {
        "reap": (lambda: load(ReapSettings, [*common, *BASE], {}), reap.run, out / "reap_metadata.json"),
        "prune": (lambda: load(PruneSettings, [*common, "--metadata-path", str(meta)], {}), prune.run, out / "pruned"),
        "test": (lambda: load(TestSettings, [*common, "--device", "cpu"], {}), evaluate.run, out / "report"),
    }[stage]
    with outputs.locked(target):
        started = time.monotonic()
        with pytest.raises(OutputError, match=f"another reap-vlm run \\(pid {os.getpid()}\\) is writing"):
            run(settings())
        assert time.monotonic() - started < 20
    assert not out.exists()  # made for the held lock and removed with it: the stage wrote nothing there


# ---- crash leftovers ---------------------------------------------------------------------------------------------


def test_a_kill_between_the_two_renames_of_overwrite_loses_nothing(world, tmp_path):
    model, meta = world
    out = tmp_path / "out"
    layout = inspect_checkpoint(model)
    write_pruned(plan_prune(layout, {k: [0, 1, 2, 3, 4, 5] for k in layout.counts()}), out)  # the earlier output
    child = _child("prune", "kill-between-renames", *_prune_args(model, meta, out, "--overwrite"), cwd=tmp_path)
    child.communicate(timeout=300)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()  # killed with the earlier output aside and the new one beside it
    (old,) = tmp_path.glob(".out.reap-old-*")
    (new,) = tmp_path.glob(".out.reap-tmp-*")
    assert outputs.is_own(new) and inspect_checkpoint(old).num_experts == 6
    said = []
    with outputs.locked(out):  # as the next run does: the killed run's lock file is not held any more
        outputs.resolve_leftovers(out, say=said.append)
    assert inspect_checkpoint(out).num_experts == 4  # the finished, verified new output is in place
    assert [s.split(":")[0] for s in said] == [
        "finished an interrupted replacement",
        "removing the replaced output of an interrupted earlier run",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_interrupted_replacement_without_a_finished_output_restores_the_earlier_one(world, tmp_path):
    model, _ = world
    out = tmp_path / "out"
    layout = inspect_checkpoint(model)
    write_pruned(plan_prune(layout, {k: [0, 1, 2, 3, 4, 5] for k in layout.counts()}), out)
    expected = _digest(out)
    os.rename(out, tmp_path / ".out.reap-old-999999")  # the state a kill leaves ...
    (tmp_path / ".out.reap-tmp-999998").mkdir()  # ... with an unfinished new output (no marker)
    (tmp_path / ".out.reap-tmp-999998" / "model.safetensors").write_bytes(b"half")
    said = []
    with outputs.locked(out):
        outputs.resolve_leftovers(out, say=said.append)
    assert _digest(out) == expected
    assert said[0].startswith("restored the earlier output") and "unfinished output" in said[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_reap_on_a_full_disk_leaves_no_file_behind(world, tmp_path):
    model, _ = world
    out = tmp_path / "outputs"
    child = _child(
        "reap", "disk-full-at-plots", "--model-path", str(model), "--output-path", str(out), *BASE, cwd=tmp_path
    )
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 2, stderr
    (line,) = _errors(stderr)
    assert "could not read or write" in line and "No space left on device" in line and "Traceback" not in stderr
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []  # no metadata, settings or plots


def test_reap_leftovers_of_a_killed_run_are_removed(world, tmp_path):
    from reap_vlm.reap import score
    from reap_vlm.settings import ReapSettings

    model, _ = world
    out = tmp_path / "outputs"
    out.mkdir()
    stale = [out / ".reap_metadata.reap-tmp-999999.json", out / ".reap_heatmap.reap-tmp-999999.png"]
    for path in stale:
        path.write_text("half")
    score(load(ReapSettings, ["--model-path", str(model), "--output-path", str(out), *BASE, "--no-plots"], {}))
    names = {p.name for p in out.iterdir()}
    assert {"reap_metadata.json", "reap_settings.json"} <= names and not [n for n in names if n.startswith(".")]


# ---- exit codes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["zero-division", "bug-error"])
def test_a_bug_exits_3_with_its_traceback(world, tmp_path, fault):
    model, meta = world
    child = _child("prune", fault, *_prune_args(model, meta, tmp_path / "out"), cwd=tmp_path)
    _, stderr = child.communicate(timeout=300)
    assert child.returncode == 3, stderr
    assert "Traceback (most recent call last)" in stderr
    (line,) = _errors(stderr)
    assert line.startswith("error: prune: bug in reap-vlm (please report it with this traceback)")
    assert ("ZeroDivisionError" if fault == "zero-division" else "an invariant broke") in line
    assert not (tmp_path / "out").exists()


# ---- messages --------------------------------------------------------------------------------------------------


def test_an_unknown_option_names_the_closest_one():
    with pytest.raises(SettingsError, match=r"unknown option --prune-ration: did you mean --prune-ratio\?"):
        load(PruneSettings, ["--prune-ration", "0.3"], {})
    with pytest.raises(SettingsError, match=r"unknown option --overwirte=1: did you mean --overwrite\?|--overwirte"):
        load(PruneSettings, ["--overwirte=1"], {})
    with pytest.raises(SettingsError, match="argument --prune-ratio: expected one argument"):
        load(PruneSettings, ["--prune-ratio"], {})
    with pytest.raises(SettingsError, match="unexpected argument 'stray'"):
        load(PruneSettings, ["stray"], {})


# ---- custom code -----------------------------------------------------------------------------------------------

SENTINEL_CODE = """
from pathlib import Path
Path(__file__).with_name("CODE_RAN").write_text("the custom code ran")
from transformers import PretrainedConfig
class CustomConfig(PretrainedConfig):
    model_type = "{model_type}"
"""


def _with_auto_map(model: Path, dst: Path, model_type: str | None) -> Path:
    shutil.copytree(model, dst)
    config = json.loads((dst / "config.json").read_text())
    if model_type:
        config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (dst / "config.json").write_text(json.dumps(config))
    (dst / "custom.py").write_text(SENTINEL_CODE.format(model_type=config["model_type"]))
    return dst


@pytest.mark.parametrize("model_type", ["my_custom_moe", None], ids=["unknown-type", "built-in-type"])
def test_verify_reports_custom_code_and_never_prompts_nor_runs_it(world, tmp_path, model_type):
    model, _ = world
    ckpt = _with_auto_map(model, tmp_path / "ckpt", model_type)
    result = subprocess.run(
        [sys.executable, "-m", "reap_vlm.verify", str(ckpt), "--json"],
        cwd=tmp_path,
        env=_env(),
        input="y\ny\n",  # an answer to a prompt, were there one
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "[y/N]" not in result.stdout + result.stderr and "Traceback" not in result.stderr
    info = json.loads(result.stdout)
    assert "auto_map in config.json (AutoConfig, AutoModelForCausalLM)" in info["custom_code"]
    assert "REAP_TRUST_REMOTE_CODE" in info["custom_code"]
    if model_type:
        assert info["custom_code"].startswith("refused by reap/test") and "is not built into" in info["custom_code"]
    else:
        assert "transformers' built-in classes for 'qwen3_moe' are used" in info["custom_code"]
    assert not (ckpt / "CODE_RAN").exists()


def test_loading_refuses_unknown_custom_code_and_notes_a_built_in_type(world, tmp_path, capsys):
    from reap_vlm.loading import load_model

    model, _ = world
    unknown = _with_auto_map(model, tmp_path / "unknown", "my_custom_moe")
    config = json.loads((unknown / "config.json").read_text())
    with pytest.raises(UnsupportedModelError, match=r"needs its own modelling code.*REAP_TRUST_REMOTE_CODE is off"):
        remote_code(unknown, config, trust=False)
    with pytest.raises(UnsupportedModelError, match="REAP_TRUST_REMOTE_CODE"):
        load_model(unknown, device="cpu", dtype="float32")
    known = _with_auto_map(model, tmp_path / "known", None)
    loaded, _, _ = load_model(known, device="cpu", dtype="float32")
    assert type(loaded).__module__.startswith("transformers.models.qwen3_moe")
    assert "custom code that is not run" in capsys.readouterr().err
    assert not (known / "CODE_RAN").exists() and not (unknown / "CODE_RAN").exists()


# ---- copying the model's other files -------------------------------------------------------------------------


def test_a_hugging_face_cache_snapshot_with_links_into_blobs_is_pruned(world, tmp_path):
    model, _ = world
    repo = tmp_path / "hub" / "models--org--tiny"  # a cache folder of its own: outputs may not go into it
    snapshot, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snapshot.mkdir(parents=True)
    blobs.mkdir()
    for i, path in enumerate(sorted(model.iterdir())):
        shutil.copy(path, blobs / f"blob{i}")
        (snapshot / path.name).symlink_to(Path("../../blobs") / f"blob{i}")
    layout = inspect_checkpoint(snapshot)
    write_pruned(plan_prune(layout, {k: [0, 2, 3, 5, 7] for k in layout.counts()}), tmp_path / "out")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()


def test_rename_noreplace_refuses_an_existing_empty_folder(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with pytest.raises(OSError) as err:
        outputs._rename_noreplace(tmp_path / "a", tmp_path / "b")
    assert err.value.errno in (errno.EEXIST, errno.ENOTEMPTY)
    outputs._rename_noreplace(tmp_path / "a", tmp_path / "c")
    assert (tmp_path / "c").is_dir() and not (tmp_path / "a").exists()
