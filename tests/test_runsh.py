"""run.sh: runtime selection, the compose invocation, passthrough, exit codes, venv stamps, .env parsing, errors.

No Docker engine is needed: a stand-in `docker` (first on PATH) answers `docker info` / `docker compose version`
as each test decides and logs every other call, one JSON line per call. A stand-in `python3` creates stand-in
virtual environments whose python/ruff/hadolint/shellcheck log their calls the same way. The last tests run the
real run.sh on the real stage scripts with this interpreter as the venv's python.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICE = "reap-vlm"
RUN = ["compose", "run", "--rm", "--user", f"{os.getuid()}:{os.getgid()}"]
COMMANDS = ("build", "reap", "prune", "test", "all", "demo", "verify", "selftest", "shell", "help")
RUNNER_KEYS = ("REAP_RUNTIME", "REAP_VENV", "REAP_GPUS", "REAP_IMAGE", "REAP_ENV_FILE")

# One program, installed under several names: its name says what it stands in for.
STAND_IN = """#!{python}
import json, os, shlex, shutil, sys

name, args = os.path.basename(sys.argv[0]), sys.argv[1:]
if name == "python3":  # the system python: creates a stand-in venv, runs anything else for real
    if args[:2] != ["-m", "venv"]:
        os.execv(sys.executable, [sys.executable, *args])
    os.makedirs(os.path.join(args[2], "bin"))
    for tool in ("python", "ruff", "hadolint", "shellcheck"):
        shutil.copy(__file__, os.path.join(args[2], "bin", tool))
    with open(os.path.join(args[2], "bin", "activate"), "w") as f:
        f.write("export VIRTUAL_ENV=" + shlex.quote(os.path.abspath(args[2])) + "\\n")
    sys.exit(0)
if name == "docker" and args[:1] == ["info"]:
    sys.exit(int(os.environ.get("DOCKER_INFO_RC", "0")))
if name == "docker" and args[:2] == ["compose", "version"]:
    version = os.environ.get("COMPOSE_VERSION", "2.29.1")
    print(version)
    sys.exit(0 if version else 1)
images = os.path.join(os.path.dirname(os.environ["CALLS"]), "images.json")  # the engine's image store
if name == "docker" and args[:2] == ["image", "inspect"]:
    labels = json.load(open(images)) if os.path.exists(images) else {{}}
    if args[-1] not in labels:
        sys.exit(1)
    print(labels[args[-1]])
    sys.exit(0)
if name == "docker" and args[:2] == ["compose", "build"] and not os.environ.get("RC_build"):
    labels = json.load(open(images)) if os.path.exists(images) else {{}}
    labels[os.environ["REAP_IMAGE"]] = os.environ["REAPVLM_SOURCE"]
    json.dump(labels, open(images, "w"))
if name == "docker" and args[:2] == ["compose", "build"]:
    name = "build"
if name == "python" and args[:1] == ["-m"] and args[1] in ("pip", "pytest"):
    name = args[1]
env = {{k: v for k, v in os.environ.items() if k.startswith("REAP")}}
with open(os.environ["CALLS"], "a") as log:
    log.write(json.dumps({{"prog": name, "argv": args, "env": env}}) + "\\n")
code = int(os.environ.get("RC_" + name, "0"))
for rule in filter(None, os.environ.get("FAIL_ON", "").split(",")):  # FAIL_ON=prune_model.py=3
    word, rc = rule.rsplit("=", 1)
    code = int(rc) if word in args else code
sys.exit(code)
"""


class Sandbox:
    """A copy of run.sh in a tmp repo, the stand-ins on PATH, and a log of their calls."""

    def __init__(self, tmp_path: Path):
        self.repo = tmp_path / "repo"
        self.repo.mkdir()
        shutil.copy(ROOT / "run.sh", self.repo / "run.sh")
        (self.repo / "requirements.txt").write_text("torch==2.14.1\n")
        (self.repo / "requirements-dev.txt").write_text("-r requirements.txt\npytest\n")
        for source in (
            "Dockerfile",
            "reap.py",
            "prune_model.py",
            "test_pruned_model.py",
            "reap_vlm/cli.py",
            "calibration/a.txt",
        ):
            (self.repo / source).parent.mkdir(exist_ok=True)
            (self.repo / source).write_text(f"{source}\n")
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for name in ("docker", "python3"):
            (self.bin / name).write_text(STAND_IN.format(python=sys.executable))
            (self.bin / name).chmod(0o755)
        self.log = tmp_path / "calls.jsonl"
        self.env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(tmp_path),
            "LANG": "C.UTF-8",
            "CALLS": str(self.log),
        }

    def run(self, *args: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.repo / "run.sh"), *args],
            env={**self.env, **env},
            input=stdin,
            capture_output=True,
            text=True,
            cwd=self.repo,
            timeout=60,
        )

    def calls(self, prog: str | None = None) -> list[dict]:
        lines = self.log.read_text().splitlines() if self.log.exists() else []
        self.log.unlink(missing_ok=True)  # each check sees the calls since the previous one
        records = [json.loads(line) for line in lines]
        return [r for r in records if prog is None or r["prog"] == prog]

    def runs(self) -> list[list[str]]:
        """The `docker compose run` calls since the last check (image builds left out)."""
        return [c["argv"] for c in self.calls("docker") if c["argv"][:2] == ["compose", "run"]]

    def without_docker(self) -> None:
        (self.bin / "docker").unlink()


@pytest.fixture
def box(tmp_path) -> Sandbox:
    return Sandbox(tmp_path)


def _stamp(path: Path) -> str:
    """The stamp format run.sh documents: the `sha256sum` line of the requirements file."""
    return f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n"


# ---- docker runtime ------------------------------------------------------------------------------------------


def test_docker_runtime_passes_arguments_verbatim(box):
    args = ["--model-path", "/models/my model", "--calibration", """say "hi", it's $HOME `x`""", "--seed=7", ""]
    result = box.run("reap", *args, REAP_RUNTIME="docker")
    assert result.returncode == 0, result.stderr
    assert box.runs() == [[*RUN, SERVICE, "reap.py", *args]]
    assert "running in" not in result.stderr  # an explicit runtime needs no note
    assert (box.repo / "models").is_dir() and (box.repo / "outputs").is_dir()  # created as the user, not by root


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (["demo", "--max-samples", "8"], ["-m", "reap_vlm.demo", "--max-samples", "8"]),
        (["verify", "/models/m", "--json"], ["-m", "reap_vlm.verify", "/models/m", "--json"]),
        (["prune", "--dry-run"], ["prune_model.py", "--dry-run"]),
        (["test", "--min-agreement", "0.9"], ["test_pruned_model.py", "--min-agreement", "0.9"]),
    ],
)
def test_auto_with_a_working_engine_runs_in_the_container(box, command, expected):
    result = box.run(*command)
    assert result.returncode == 0, result.stderr
    assert box.runs() == [[*RUN, SERVICE, *expected]]
    assert "REAP_RUNTIME=auto: running in docker" in result.stderr


@pytest.mark.parametrize("code", [1, 2, 3, 130])
def test_the_container_exit_code_is_returned(box, code):
    assert box.run("test", REAP_RUNTIME="docker", RC_docker=str(code)).returncode == code


def test_settings_reach_compose_and_the_container(box):
    (box.repo / "gpu.env").write_text("REAP_GPUS=2\nREAP_IMAGE=me/reap:1\nREAP_SEED=1\n")
    result = box.run("--env-file", "gpu.env", "reap", REAP_RUNTIME="docker", REAP_SEED="7", REAP_MAX_SAMPLES="8")
    assert result.returncode == 0, result.stderr
    (call,) = box.calls("docker")
    # compose interpolates these (image, GPU count, the env_file it passes to the container)
    assert {k: call["env"][k] for k in ("REAP_GPUS", "REAP_IMAGE", "REAP_ENV_FILE")} == {
        "REAP_GPUS": "2",
        "REAP_IMAGE": "me/reap:1",
        "REAP_ENV_FILE": "gpu.env",
    }
    # the caller's stage settings are passed in (they win over the file's, as in local mode); runner keys are not
    passed = [call["argv"][i + 1] for i, a in enumerate(call["argv"]) if a == "-e"]
    assert sorted(passed) == ["REAP_MAX_SAMPLES=8", "REAP_SEED=7"]
    assert call["argv"][-2:] == [SERVICE, "reap.py"]


def test_image_is_built_when_missing_or_made_from_other_code(box):
    def builds_and_runs() -> list[str]:
        return [c["prog"] for c in box.calls()]

    first = box.run("reap", REAP_RUNTIME="docker")
    assert builds_and_runs() == ["build", "docker"] and "building reap-vlm:latest" in first.stderr
    box.run("prune", REAP_RUNTIME="docker")
    assert builds_and_runs() == ["docker"]  # up to date: no build, no registry round trip
    (box.repo / ".env").write_text("REAP_SEED=1\n")
    (box.repo / "reap_vlm" / "cli.cpython-311.pyc").write_bytes(b"\0")
    box.run("prune", REAP_RUNTIME="docker")
    assert builds_and_runs() == ["docker"]  # neither settings nor bytecode are in the image
    (box.repo / "reap_vlm" / "cli.py").write_text("changed\n")
    box.run("prune", REAP_RUNTIME="docker")
    assert builds_and_runs() == ["build", "docker"]
    box.run("prune", REAP_RUNTIME="docker", REAP_IMAGE="me/other:1")
    assert builds_and_runs() == ["build", "docker"]  # another image name: built as well
    failed = box.run("prune", REAP_RUNTIME="docker", REAP_IMAGE="me/third:1", RC_build="17")
    assert failed.returncode == 17 and builds_and_runs() == ["build"]  # no run on a failed build


def test_docker_required_but_not_usable_is_one_line(box):
    for env in ({"DOCKER_INFO_RC": "1"}, {"COMPOSE_VERSION": "2.20.3"}, {"COMPOSE_VERSION": ""}):
        result = box.run("reap", REAP_RUNTIME="docker", **env)
        assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "REAP_RUNTIME=docker, but" in result.stderr
    assert box.calls() == []


def test_build_uses_compose(box):
    (box.repo / ".env").write_text("REAP_IMAGE=me/reap:2\n")
    assert box.run("build", "--no-cache").returncode == 0
    (call,) = box.calls()
    assert call["argv"] == ["compose", "build", "--no-cache", SERVICE] and call["env"]["REAP_IMAGE"] == "me/reap:2"
    assert len(call["env"]["REAPVLM_SOURCE"]) == 64  # the label: a sha256 of the code the image copies
    box.without_docker()
    result = box.run("build")
    assert result.returncode == 2 and "build needs Docker" in result.stderr


def test_shell_in_the_container(box):
    assert box.run("shell", REAP_RUNTIME="docker").returncode == 0
    assert box.runs() == [[*RUN, "--entrypoint", "bash", SERVICE]]


# ---- local runtime -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "no_docker",
    [{"DOCKER_INFO_RC": "1"}, {"COMPOSE_VERSION": "2.23.0"}, {"COMPOSE_VERSION": ""}, "not installed"],
    ids=["engine-down", "compose-too-old", "no-compose", "no-docker"],
)
def test_auto_without_docker_runs_locally(box, no_docker):
    if no_docker == "not installed":
        box.without_docker()
        no_docker = {}
    result = box.run("reap", "--model-path", "models/m", **no_docker)
    assert result.returncode == 0, result.stderr
    assert [(c["prog"], c["argv"]) for c in box.calls()] == [
        ("pip", ["-m", "pip", "install", "--disable-pip-version-check", "-r", "requirements.txt"]),
        ("python", ["reap.py", "--model-path", "models/m"]),
    ]
    assert "running in local" in result.stderr and "about 3-5 minutes" in result.stderr


def test_venv_is_created_once_and_refreshed_when_requirements_change(box):
    first = box.run("prune", "--dry-run", REAP_RUNTIME="local")
    assert first.returncode == 0, first.stderr
    assert [c["prog"] for c in box.calls()] == ["pip", "python"]
    stamp = box.repo / ".venv" / ".reap-requirements.txt.sha256"
    assert stamp.read_text() == _stamp(box.repo / "requirements.txt")
    second = box.run("prune", "--dry-run", REAP_RUNTIME="local")
    assert [c["prog"] for c in box.calls()] == ["python"] and second.stderr == ""
    (box.repo / "requirements.txt").write_text("torch==2.14.1\nnumpy==2.4.6\n")
    third = box.run("prune", REAP_RUNTIME="local")
    assert [c["prog"] for c in box.calls()] == ["pip", "python"]
    assert "requirements.txt new or changed" in third.stderr and "creating" not in third.stderr
    assert stamp.read_text() == _stamp(box.repo / "requirements.txt")


def test_failed_install_stops_and_is_retried(box):
    result = box.run("reap", REAP_RUNTIME="local", RC_pip="1")
    assert result.returncode == 1 and "pip could not install requirements.txt" in result.stderr
    assert [c["prog"] for c in box.calls()] == ["pip"]  # the stage did not run
    assert box.run("reap", REAP_RUNTIME="local").returncode == 0
    assert [c["prog"] for c in box.calls()] == ["pip", "python"]  # no stamp was written: installed again


def test_local_exit_code_is_returned(box):
    assert box.run("test", REAP_RUNTIME="local", RC_python="1").returncode == 1


def test_shell_with_the_venv_active(box):
    result = box.run("shell", REAP_RUNTIME="local", stdin='echo "venv=$VIRTUAL_ENV"\n')
    assert result.returncode == 0, result.stderr
    assert f"venv={box.repo / '.venv'}" in result.stdout


# ---- settings from .env --------------------------------------------------------------------------------------


def test_dotenv_is_parsed_like_python_dotenv(box):
    (box.repo / ".env").write_text(
        "REAP_RUNTIME=docker\r\n"
        'export REAP_RUNTIME="local"  # later lines win\r\n'
        "REAP_VENV='envs/my venv' # quoted, with a comment\n"
        "#REAP_VENV=commented-out\n"
        "REAP_SEED=3"
    )
    assert box.run("reap").returncode == 0
    assert [c["prog"] for c in box.calls()] == ["pip", "python"]
    assert (box.repo / "envs" / "my venv" / "bin" / "python").exists()
    assert box.run("reap", REAP_RUNTIME="docker").returncode == 0  # the environment beats the file
    assert [c["prog"] for c in box.calls()] == ["build", "docker"]


def test_dotenv_is_never_executed(box, tmp_path):
    marker = tmp_path / "executed"
    (box.repo / ".env").write_text(
        f"REAP_RUNTIME=local\n$(touch {marker})\nREAP_VENV=$(touch {marker})\nREAP_SEED=`touch {marker}`\n"
        f"touch {marker}\n"
    )
    assert box.run("reap").returncode == 0
    assert not marker.exists()
    assert (box.repo / f"$(touch {marker})" / "bin" / "python").exists()  # the value is taken literally


# ---- all -----------------------------------------------------------------------------------------------------


def test_all_gives_its_flags_to_every_stage(box):
    result = box.run("all", "--model-path", "/models/m x", "--prune-ratio=0.3", "--no-plots", "--overwrite")
    assert result.returncode == 0, result.stderr
    calls = box.calls("docker")
    assert [c["argv"][-1] for c in calls] == ["reap.py", "prune_model.py", "test_pruned_model.py"]
    for call in calls:
        passed = {call["argv"][i + 1] for i, a in enumerate(call["argv"]) if a == "-e"}
        assert passed == {
            "REAP_MODEL_PATH=/models/m x",
            "REAP_PRUNE_RATIO=0.3",
            "REAP_PLOTS=false",
            "REAP_OVERWRITE=true",
        }
    assert result.stderr.count("running in docker") == 1  # the runtime is picked once


def test_all_in_the_venv_and_first_failure_stops(box):
    result = box.run("all", "--max-samples", "8", REAP_RUNTIME="local", FAIL_ON="prune_model.py=3")
    assert result.returncode == 3
    calls = box.calls("python")
    assert [c["argv"] for c in calls] == [["reap.py"], ["prune_model.py"]]
    assert all(c["env"]["REAP_MAX_SAMPLES"] == "8" for c in calls)


# ---- selftest ------------------------------------------------------------------------------------------------


def test_selftest_is_local_lints_then_runs_pytest(box):
    result = box.run("selftest", "-k", "settings", "-q", REAP_RUNTIME="docker")
    assert result.returncode == 0, result.stderr
    assert [(c["prog"], c["argv"]) for c in box.calls()] == [
        ("pip", ["-m", "pip", "install", "--disable-pip-version-check", "-r", "requirements-dev.txt"]),
        ("ruff", ["check", "."]),
        ("ruff", ["format", "--check", "."]),
        ("hadolint", ["Dockerfile"]),
        ("shellcheck", ["run.sh", ".ci/run"]),
        ("pytest", ["-m", "pytest", "-m", "not slow", "-k", "settings", "-q"]),
    ]
    assert box.run("selftest", "--all").returncode == 0
    assert box.calls("pytest")[0]["argv"] == ["-m", "pytest", "-m", "slow or not slow"]
    # the dev install covers requirements.txt: the stages run without installing again
    assert box.run("reap", REAP_RUNTIME="local").returncode == 0
    assert [c["prog"] for c in box.calls()] == ["python"]


def test_selftest_failures(box):
    assert box.run("selftest", RC_pytest="5").returncode == 5  # "no tests ran" reaches .ci/run, which fails on it
    assert [c["prog"] for c in box.calls()] == ["pip", "ruff", "ruff", "hadolint", "shellcheck", "pytest"]
    assert box.run("selftest", RC_ruff="1").returncode == 1
    assert [c["prog"] for c in box.calls()] == ["ruff"]  # a lint failure stops before pytest


# ---- bad input and help --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["frobnicate"], {}, "unknown command 'frobnicate': use one of build reap"),
        (["reap"], {"REAP_RUNTIME": "kubernetes"}, "REAP_RUNTIME=kubernetes is not valid"),
        (["reap"], {"REAP_ENV_FILE": "missing.env"}, "REAP_ENV_FILE=missing.env does not exist"),
        (["--env-file", "missing.env", "reap"], {}, "REAP_ENV_FILE=missing.env does not exist"),
        (["--env-file"], {}, "--env-file needs a file"),
        (["reap"], {"REAP_RUNTIME": "docker", "REAP_GPUS": "two"}, "REAP_GPUS=two is not valid"),
        (["all", "/models/m"], {}, "all takes --option [value] pairs"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(box, args, env, message):
    result = box.run(*args, **env)
    assert result.returncode == 2
    assert result.stderr.startswith("run.sh: error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and result.stdout == ""
    assert box.calls() == []


def test_runtime_from_dotenv_is_validated(box):
    (box.repo / ".env").write_text("REAP_RUNTIME=podman\n")
    result = box.run("demo")
    assert result.returncode == 2 and "REAP_RUNTIME=podman is not valid" in result.stderr


def test_help_lists_every_command_and_runner_key(box):
    text = box.run("help").stdout
    listed = [line.split()[0] for line in text.splitlines() if line.startswith("  ") and not line.startswith("   ")]
    assert [w for w in listed if not w.startswith("REAP_")] == list(COMMANDS)
    for key in RUNNER_KEYS:
        assert f"  {key} " in text
    for same in ([], ["-h"], ["--help"], ["all", "--help"]):
        assert box.run(*same).stdout == text
    assert box.calls() == []


# ---- the real run.sh on the real stage scripts ---------------------------------------------------------------


@pytest.fixture
def this_python_as_venv(tmp_path) -> Path:
    """A venv folder whose python is this interpreter, stamped as holding requirements.txt."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    (venv / "bin" / "python").chmod(0o755)
    (venv / ".reap-requirements.txt.sha256").write_text(_stamp(ROOT / "requirements.txt"))
    return venv


@pytest.mark.parametrize(
    ("command", "expected"),
    [(["reap", "--help"], "[REAP_SCORING_MODE;"), (["verify", "--help"], "./run.sh verify")],
)
def test_local_mode_runs_the_real_stage(this_python_as_venv, tmp_path, command, expected):
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env.update(REAP_RUNTIME="local", REAP_VENV=str(this_python_as_venv))
    result = subprocess.run(
        [str(ROOT / "run.sh"), *command], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage:") and expected in result.stdout
    assert result.stderr == ""  # the stamp matched: nothing was installed


def test_demo_refuses_a_folder_of_the_users(this_python_as_venv, tmp_path):
    """./run.sh demo --output-path X never deletes a non-empty folder without the tool's marker."""
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("years of work")
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env.update(REAP_RUNTIME="local", REAP_VENV=str(this_python_as_venv))
    result = subprocess.run(
        [str(ROOT / "run.sh"), "demo", "--output-path", str(folder)],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: the demo folder") and "no .reap-vlm-output marker" in line
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    assert (folder / "thesis.tex").read_text() == "years of work"


# ---- reap --gpus N: data-parallel ranks through torchrun -------------------------------------------------------

DATA_PARALLEL = ["-m", "reap_vlm.distributed", "--standalone", "--nproc-per-node"]


def test_reap_gpus_starts_torchrun_in_the_container_with_that_many_gpus(box):
    result = box.run("reap", "--seed", "7", "--gpus", "2", "--model-path", "/models/m", REAP_RUNTIME="docker")
    assert result.returncode == 0, result.stderr
    (call,) = [c for c in box.calls("docker") if c["argv"][:2] == ["compose", "run"]]
    assert call["argv"] == [*RUN, SERVICE, *DATA_PARALLEL, "2", "reap.py", "--seed", "7", "--model-path", "/models/m"]
    assert call["env"]["REAP_GPUS"] == "2"  # compose reserves exactly the GPUs the ranks use
    box.run("reap", "--gpus=4", REAP_RUNTIME="docker", REAP_GPUS="8")
    (call,) = [c for c in box.calls("docker") if c["argv"][:2] == ["compose", "run"]]
    assert call["argv"][-2:] == ["4", "reap.py"] and call["env"]["REAP_GPUS"] == "8"  # a larger reservation stays
    box.run("reap", "--gpus", "1", "--seed", "7", REAP_RUNTIME="docker")
    assert box.runs() == [[*RUN, SERVICE, "reap.py", "--seed", "7"]]  # one GPU: one process, as without --gpus


def test_reap_gpus_runs_torchrun_in_the_local_venv(box):
    result = box.run("reap", "--gpus", "2", REAP_RUNTIME="local")
    assert result.returncode == 0, result.stderr
    (call,) = box.calls("python")
    assert call["argv"] == [*DATA_PARALLEL, "2", "reap.py"]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["reap", "--gpus", "two"], {}, "--gpus two is not a count"),
        (["reap", "--gpus", "0"], {}, "--gpus 0 is not a count"),
        (["reap", "--gpus"], {}, "--gpus needs a count"),
        (["reap", "--gpus", "4"], {"REAP_GPUS": "2"}, "REAP_GPUS=2 reserves fewer GPUs than --gpus 4"),
    ],
)
def test_reap_gpus_bad_input_is_one_line(box, args, env, message):
    result = box.run(*args, REAP_RUNTIME="docker", **env)
    assert result.returncode == 2 and result.stderr.startswith("run.sh: error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1 and box.runs() == []
