"""The installable package: pyproject's package list, package data and pins; `reap-vlm` / `python -m reap_vlm`;
and (slow) the built wheel installed into a fresh virtual environment, offline."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from fnmatch import fnmatch
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

from reap_vlm.command import flags_to_settings
from reap_vlm.command import main as command_main

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-"):
            req = Requirement(line)
            pins[req.name.lower().replace("_", "-")] = str(req.specifier).removeprefix("==")
    return pins


def test_pyproject_pins_are_compatible_releases_that_admit_the_exact_pins():
    exact = _pins(ROOT / "requirements.txt")
    deps = [Requirement(d) for d in PYPROJECT["project"]["dependencies"]]
    for req in deps:
        name = req.name.lower().replace("_", "-")
        assert [s.operator for s in req.specifier] == ["~="], f"{req}: use a compatible-release pin"
        assert name in exact, f"{name} is in pyproject but not pinned in requirements.txt"
        assert req.specifier.contains(exact[name]), f"{req} does not admit requirements.txt's {exact[name]}"
    assert {r.name.lower().replace("_", "-") for r in deps} == set(exact), "pyproject and requirements.txt differ"


def test_pyproject_ships_every_package_and_every_calibration_file():
    from setuptools import find_packages

    tool = PYPROJECT["tool"]["setuptools"]
    assert set(tool["packages"]) == {*find_packages(str(ROOT), include=["reap_vlm*"]), "reap_vlm.calibration_data"}
    assert tool["package-dir"] == {"reap_vlm.calibration_data": "calibration"}
    patterns = tool["package-data"]["reap_vlm.calibration_data"]
    files = [p.relative_to(ROOT / "calibration").as_posix() for p in (ROOT / "calibration").rglob("*") if p.is_file()]
    missing = [f for f in files if "__pycache__" not in f and not any(fnmatch(f, pat) for pat in patterns)]
    assert files and not missing, missing
    demo = [p.name for p in (ROOT / "reap_vlm" / "demo_vlm").iterdir()]
    assert all(fnmatch(f"demo_vlm/{name}", tool["package-data"]["reap_vlm"][0]) for name in demo)
    assert PYPROJECT["project"]["scripts"] == {"reap-vlm": "reap_vlm.command:main"}


def test_reap_vlm_command_lists_commands_and_refuses_unknown_ones(capsys):
    assert command_main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {c} " in out for c in ("reap", "prune", "test", "all", "verify", "demo"))
    assert command_main(["prun"]) == 2
    assert "unknown command 'prun': did you mean prune?" in capsys.readouterr().err


def test_all_flags_become_settings_for_every_stage():
    assert flags_to_settings(["--prune-ratio", "0.3", "--no-plots", "--overwrite", "--seed=7", "--eval-ratios="]) == {
        "REAP_PRUNE_RATIO": "0.3",
        "REAP_PLOTS": "false",
        "REAP_OVERWRITE": "true",
        "REAP_SEED": "7",
        "REAP_EVAL_RATIOS": "",
    }


def _module(args, cwd, **env):
    return subprocess.run(
        [sys.executable, "-m", "reap_vlm", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


def test_reap_vlm_runs_the_stages_and_verify(tmp_path, tiny_text_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        command_main(["prune", "--help"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("usage: reap-vlm prune")
    assert command_main(["verify", str(tiny_text_dir), "--json"]) == 0
    assert '"experts": 8' in capsys.readouterr().out
    assert command_main(["all", "0.3"]) == 2
    assert "all takes --option [value] pairs" in capsys.readouterr().err


def test_python_m_reap_vlm_all_stops_at_the_first_stage(tmp_path):
    """`python -m reap_vlm all`: a misspelt flag stops the first stage (a child process) at once, with its one
    line and exit code 2."""
    result = _module(["all", "--prune-rato", "0.3"], tmp_path)
    assert result.returncode == 2 and "did you mean REAP_PRUNE_RATIO?" in result.stderr, result.stderr
    assert "== reap-vlm reap" in result.stderr and "== reap-vlm prune" not in result.stderr


def _site_packages(python: Path) -> Path:
    out = subprocess.check_output([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    return Path(out.decode().strip())


@pytest.mark.slow
def test_wheel_installs_offline_into_a_fresh_venv_and_runs(tmp_path, tiny_vl_dir):
    """Build the wheel from a copy of the sources, install it with --no-index into a new venv whose only extra
    path is this environment's site-packages (so pip finds every dependency installed and downloads nothing),
    then run the console script and read the built-in calibration from the installed package."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "reap_vlm", src / "reap_vlm", ignore=ignore)
    shutil.copytree(ROOT / "calibration", src / "calibration", ignore=ignore)
    dist = tmp_path / "dist"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-build-isolation", "--no-deps", "-q", "-w", str(dist), str(src)], check=True)
    (wheel,) = dist.glob("reap_vlm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "reap_vlm/calibration_data/tasks/eval.jsonl" in names and "reap_vlm/demo_vlm/config.json" in names

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    (_site_packages(python) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(python), "install", "--no-index", "-q", str(wheel)], check=True)

    work = tmp_path / "work"  # not the checkout: only the installed package can be imported
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run(
        [str(venv / "bin" / "reap-vlm"), "verify", str(tiny_vl_dir), "--json"],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0 and '"model_type": "qwen3_vl_moe"' in result.stdout, result.stderr
    probe = (
        "import reap_vlm.calibration as c; s = c.read_source('tasks', 'evaluation'); "
        "print(c.CALIBRATION_DIR); print(len(s), sum(1 for x in s if x.images))"
    )
    result = subprocess.run([str(python), "-c", probe], cwd=work, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    where, counts = result.stdout.split("\n")[:2]
    assert Path(where).is_relative_to(_site_packages(python)), where
    total, with_images = map(int, counts.split())
    assert total > 0 and with_images == total
