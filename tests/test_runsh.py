"""run.sh: dispatch in docker and local runtimes, passthrough, exit codes, venv stamps, errors."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _exe(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


@pytest.fixture
def sandbox(tmp_path):
    """A copy of run.sh with stand-in stage scripts, a stand-in docker and a stand-in python3 on PATH."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(ROOT / "run.sh", repo / "run.sh")
    (repo / "requirements.txt").write_text("torch==0\n")
    (repo / "requirements-dev.txt").write_text("-r requirements.txt\npytest==0\n")
    for script in ("reap.py", "prune_model.py", "test_pruned_model.py"):
        (repo / script).write_text("")
    bin_dir = tmp_path / "bin"
    log = tmp_path / "calls.log"
    # docker: `info` / `compose version` succeed unless DOCKER_BROKEN is set; every call is logged one arg per line
    _exe(
        bin_dir / "docker",
        f"""
if [[ "$1" == info ]]; then [[ -z "${{DOCKER_BROKEN:-}}" ]]; exit $?; fi
if [[ "$1 $2" == "compose version" ]]; then exit 0; fi
{{ echo "docker"; printf '%s\\n' "$@"; echo "--end--"; }} >> "{log}"
exit "${{DOCKER_RC:-0}}"
""",
    )
    # python3 -m venv DIR: create DIR/bin/python that logs its arguments (pip installs included)
    stub = _exe(
        tmp_path / "venv-python",
        f'{{ echo venv-python; printf "%s\\n" "$@"; echo --end--; }} >> "{log}"\nexit "${{PY_RC:-0}}"\n',
    )
    _exe(
        bin_dir / "python3",
        f"""
if [[ "$1 $2" == "-m venv" ]]; then mkdir -p "$3/bin"; cp "{stub}" "$3/bin/python"; exit 0; fi
exec {sys.executable} "$@"
""",
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "LANG": "C.UTF-8"}
    return repo, env, log


def _run(repo, env, *args, **extra):
    return subprocess.run(
        [str(repo / "run.sh"), *args], env={**env, **extra}, capture_output=True, text=True, cwd=repo, timeout=60
    )


def _calls(log: Path) -> list[list[str]]:
    if not log.exists():
        return []
    calls, current = [], []
    for line in log.read_text().splitlines():
        if line == "--end--":
            calls.append(current)
            current = []
        else:
            current.append(line)
    return calls


def test_docker_runtime_invocation_and_passthrough(sandbox):
    repo, env, log = sandbox
    result = _run(repo, env, "reap", "--model-path", "/models/my model", "--prune-ratio", "0.3", REAP_RUNTIME="docker")
    assert result.returncode == 0, result.stderr
    assert _calls(log) == [
        [
            "docker",
            "compose",
            "run",
            "--rm",
            "reap-vlm",
            "reap.py",
            "--model-path",
            "/models/my model",
            "--prune-ratio",
            "0.3",
        ]
    ]


def test_auto_uses_docker_when_the_engine_answers(sandbox):
    repo, env, log = sandbox
    assert _run(repo, env, "demo", "--max-samples", "8").returncode == 0
    assert _calls(log) == [
        ["docker", "compose", "run", "--rm", "reap-vlm", "-m", "reap_vlm.demo", "--max-samples", "8"]
    ]


def test_exit_codes_propagate(sandbox):
    repo, env, _ = sandbox
    assert _run(repo, env, "test", REAP_RUNTIME="docker", DOCKER_RC="1").returncode == 1
    assert _run(repo, env, "prune", REAP_RUNTIME="docker", DOCKER_RC="2").returncode == 2


def test_compose_file_gets_the_env_file_and_gpus(sandbox):
    repo, env, log = sandbox
    _exe(
        repo.parent / "bin" / "docker",
        f"""
if [[ "$1" == info || "$1 $2" == "compose version" ]]; then exit 0; fi
echo "REAP_ENV_FILE=${{REAP_ENV_FILE:-}} REAP_GPUS=$REAP_GPUS REAP_IMAGE=$REAP_IMAGE" >> "{log}"
""",
    )
    (repo / "custom.env").write_text("REAP_GPUS=2\nREAP_IMAGE=me/reap:1\n")
    assert _run(repo, env, "reap", REAP_ENV_FILE="custom.env").returncode == 0
    assert log.read_text().strip() == "REAP_ENV_FILE=custom.env REAP_GPUS=2 REAP_IMAGE=me/reap:1"


def test_auto_falls_back_to_local_and_installs_once(sandbox):
    repo, env, log = sandbox
    first = _run(repo, env, "reap", "--help", DOCKER_BROKEN="1")
    assert first.returncode == 0, first.stderr
    calls = _calls(log)
    assert calls[0][:5] == ["venv-python", "-m", "pip", "install", "--quiet"] and calls[0][-1] == "requirements.txt"
    assert calls[1] == ["venv-python", "reap.py", "--help"]
    assert (repo / ".venv" / ".reap-requirements").is_file()
    log.unlink()
    assert _run(repo, env, "prune", DOCKER_BROKEN="1").returncode == 0
    assert _calls(log) == [["venv-python", "prune_model.py"]]  # no reinstall: requirements unchanged
    log.unlink()
    (repo / "requirements.txt").write_text("torch==1\n")
    assert _run(repo, env, "prune", REAP_RUNTIME="local").returncode == 0
    assert [c[:4] for c in _calls(log)] == [["venv-python", "-m", "pip", "install"], ["venv-python", "prune_model.py"]]


def test_local_runtime_from_dotenv_and_custom_venv(sandbox):
    repo, env, log = sandbox
    (repo / ".env").write_text('REAP_RUNTIME="local"\nREAP_VENV=envs/x\n')
    assert _run(repo, env, "test", "--eval-samples", "4").returncode == 0
    assert _calls(log)[-1] == ["venv-python", "test_pruned_model.py", "--eval-samples", "4"]
    assert (repo / "envs" / "x" / "bin" / "python").exists()


def test_dotenv_is_never_executed(sandbox, tmp_path):
    repo, env, _ = sandbox
    marker = tmp_path / "pwned"
    (repo / ".env").write_text(f"REAP_RUNTIME=local\n$(touch {marker})\nREAP_SEED=`touch {marker}`\n")
    _run(repo, env, "prune")
    assert not marker.exists()


def test_selftest_is_always_local(sandbox):
    repo, env, log = sandbox
    _run(repo, env, "selftest", "-k", "settings", REAP_RUNTIME="docker")
    calls = _calls(log)
    assert all(c[0] != "docker" for c in calls)
    assert calls[0][-1] == "requirements-dev.txt"


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        (["frobnicate"], {}, "unknown command 'frobnicate'"),
        (["reap"], {"REAP_RUNTIME": "kubernetes"}, "REAP_RUNTIME=kubernetes is not valid"),
        (["reap"], {"REAP_ENV_FILE": "missing.env"}, "REAP_ENV_FILE=missing.env does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(sandbox, args, extra, message):
    repo, env, log = sandbox
    result = _run(repo, env, *args, **extra)
    assert result.returncode == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not _calls(log)


def test_help_lists_every_command(sandbox):
    repo, env, _ = sandbox
    out = _run(repo, env, "help").stdout
    for command in ("build", "reap", "prune", "test", "all", "demo", "verify", "selftest", "shell", "help"):
        assert f"  {command}" in out
    for key in ("REAP_RUNTIME", "REAP_VENV", "REAP_GPUS", "REAP_IMAGE", "REAP_ENV_FILE"):
        assert key in out
    assert _run(repo, env).stdout == out


def test_all_stops_at_the_first_failure(sandbox):
    repo, env, log = sandbox
    _exe(
        repo.parent / "bin" / "docker",
        f"""
if [[ "$1" == info || "$1 $2" == "compose version" ]]; then exit 0; fi
echo "$5" >> "{log}"
[[ "$5" == prune_model.py ]] && exit 1
exit 0
""",
    )
    assert _run(repo, env, "all").returncode == 1
    assert log.read_text().split() == ["reap.py", "prune_model.py"]


def test_local_mode_for_real(tmp_path):
    """The real run.sh runs the real reap.py in a venv (a wrapper around this interpreter, stamp up to date)."""
    venv = tmp_path / "venv"
    _exe(venv / "bin" / "python", f'exec "{sys.executable}" "$@"\n')
    digest = hashlib.sha256((ROOT / "requirements.txt").read_bytes() * 2).hexdigest()
    (venv / ".reap-requirements").write_text(f"{digest}-requirements.txt\n")
    env = {**os.environ, "REAP_RUNTIME": "local", "REAP_VENV": str(venv)}
    result = subprocess.run(
        [str(ROOT / "run.sh"), "reap", "--help"], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "--scoring-mode" in result.stdout and "[REAP_SCORING_MODE]" in result.stdout
    assert "installing" not in result.stderr
