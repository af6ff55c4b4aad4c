"""Container packaging and CI: hadolint, shellcheck, the Dockerfile's rules, the compose file's structure and its
agreement with the Dockerfile, run.sh and the settings, the build context, and .ci/run's exit codes."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from reap_vlm.settings import ReapSettings, RunnerSettings

ROOT = Path(__file__).resolve().parents[1]


def _tool(name: str) -> str:
    """A lint tool from requirements-dev.txt: beside this interpreter (the venv), else on PATH."""
    found = Path(sys.executable).parent / name
    path = str(found) if found.exists() else shutil.which(name)
    if not path:
        pytest.skip(f"{name} is not installed (pip install -r requirements-dev.txt)")
    return path


def _instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(row.split(None, 1)[0].upper(), row.split(None, 1)[1]) for row in rows]


def _env() -> dict[str, str]:
    pairs = " ".join(args for op, args in _instructions() if op == "ENV")
    return dict(re.findall(r"(\w+)=(\S+)", pairs))


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _service() -> dict:
    runsh = (ROOT / "run.sh").read_text()
    name = re.search(r"^SERVICE=(\S+)$", runsh, re.M).group(1)  # the service run.sh runs
    return _compose()["services"][name]


def _interpolation_default(value: str, key: str) -> str:
    match = re.fullmatch(r"\$\{" + key + r":-([^}]*)\}", value)
    assert match, f"{value!r} should be ${{{key}:-default}}"
    return match.group(1)


def _runner_default(name: str) -> str:
    return next(f.default for f in dataclasses.fields(RunnerSettings) if f.name == name)


# ---- linters -------------------------------------------------------------------------------------------------


def test_hadolint_passes():
    result = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout == "", result.stdout + result.stderr


def test_shellcheck_passes_and_scripts_are_strict():
    result = subprocess.run([_tool("shellcheck"), "run.sh", ".ci/run"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for script in ("run.sh", ".ci/run"):
        lines = (ROOT / script).read_text().splitlines()
        assert lines[0] == "#!/usr/bin/env bash" and "set -euo pipefail" in lines[:8], script
        assert (ROOT / script).stat().st_mode & 0o111, f"{script} is executable"


# ---- Dockerfile ----------------------------------------------------------------------------------------------


def test_base_image_is_a_pinned_cuda_runtime():
    base = next(args for op, args in _instructions() if op == "FROM")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d\d\.\d\d", base), base


def test_base_cuda_matches_the_pinned_torch_wheel():
    """torch.version.cuda of the installed torch (read from torch/version.py, no import) is the base's CUDA."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("torch is not installed")
    version_py = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    installed = re.search(r"__version__ = '([^'+]+)", version_py).group(1)
    cuda = re.search(r"^cuda: .*= '([\d.]+)'", version_py, re.M)
    pinned = re.search(r"^torch==(\S+)", (ROOT / "requirements.txt").read_text(), re.M).group(1)
    if installed != pinned or cuda is None:
        pytest.skip(f"installed torch {installed} (cuda {cuda and cuda.group(1)}) is not the pinned CUDA wheel")
    base = next(args for op, args in _instructions() if op == "FROM")
    assert base.split(":")[1].startswith(cuda.group(1) + "."), (base, cuda.group(1))


def test_dockerfile_user_layers_and_environment():
    steps = _instructions()
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image runs as a non-root user"
    uid = users[-1].split(":")[0]
    runs = " ".join(args for op, args in steps if op == "RUN")
    assert f"--uid {uid}" in runs, "USER is the user the Dockerfile creates"
    if "ubuntu24.04" in steps[0][1]:  # Ubuntu 24.04 images ship `ubuntu` with uid 1000: useradd would fail
        assert runs.index("userdel --remove ubuntu") < runs.index(f"useradd --uid {uid}")

    def first(predicate) -> int:
        return next(i for i, (op, args) in enumerate(steps) if predicate(op, args))

    copy_reqs = first(lambda op, args: op == "COPY" and args.split()[0] == "requirements.txt")
    install = first(lambda op, args: op == "RUN" and "pip install --no-cache-dir -r requirements.txt" in args)
    copy_code = first(lambda op, args: op == "COPY" and args.split()[0] != "requirements.txt")
    assert copy_reqs < install < copy_code, "dependencies are installed before the code is copied"

    env = _env()
    assert env["HF_HOME"] == "/cache/huggingface" and env["PYTHONUNBUFFERED"] == "1"
    assert [op for op, _ in steps].count("ENTRYPOINT") == 1
    secrets = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY)", re.I)
    assert not [args for op, args in steps if op in ("ENV", "ARG") and secrets.search(args)]


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a top-level path: the last matching pattern decides, `!` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or fnmatch.fnmatch(path, pattern.removeprefix("**/")):
            ignored = not negate
    return ignored


def test_build_context_holds_what_the_image_copies_and_nothing_heavy_or_secret():
    patterns = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    sources = [
        src for op, args in _instructions() if op == "COPY" for src in args.split()[:-1] if not src.startswith("--")
    ]
    for src in sources:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert not _ignored(src, patterns), f"COPY {src}: excluded by .dockerignore"
    for heavy in (".venv", ".git", "outputs", "models", ".env", "prod.env", "__pycache__", ".pytest_cache", "tests"):
        assert _ignored(heavy, patterns), f"{heavy} reaches the build context"
    # every stage can run in the image: the three scripts, the library and the built-in calibration data
    assert {"reap.py", "prune_model.py", "test_pruned_model.py", "reap_vlm", "calibration"} <= set(sources)


# ---- docker-compose.yml --------------------------------------------------------------------------------------


def test_compose_service_runs_the_image_with_gpus_and_the_env_file():
    service = _service()
    assert service["build"]["context"] == "."
    assert _interpolation_default(service["image"], "REAP_IMAGE") == _runner_default("image")
    (env_file,) = service["env_file"]
    assert env_file["required"] is False  # a checkout without .env still runs
    assert _interpolation_default(env_file["path"], "REAP_ENV_FILE") == _runner_default("env_file")
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert _interpolation_default(device["count"], "REAP_GPUS") == _runner_default("gpus")
    # HF_HOME stays on the cache volume whatever a .env says; REAP_ENV_FILE names a host file, not one inside
    # the host's hub cache is mounted read-only, so the container never downloads (HF_HUB_OFFLINE)
    assert service["environment"] == {"HF_HOME": _env()["HF_HOME"], "REAP_ENV_FILE": "", "HF_HUB_OFFLINE": "1"}
    assert service["init"] is True
    size = re.fullmatch(r"(\d+)gb", service["shm_size"])
    assert size and int(size.group(1)) >= 8, "DataLoader workers and NCCL need a large /dev/shm"


def test_compose_agrees_with_the_dockerfile_and_the_code():
    service, steps = _service(), _instructions()
    workdir = next(args for op, args in reversed(steps) if op == "WORKDIR")
    assert service["working_dir"] == workdir
    user = next(args for op, args in reversed(steps) if op == "USER")
    assert service["user"] == user and not user.startswith(("0", "root"))
    mounts = {v.split(":")[1]: v for v in service["volumes"]}
    assert mounts["/models"] == "./models:/models"
    outputs = f"{workdir}/{ReapSettings().output_path}"  # the default output folder, relative to the working dir
    assert mounts[outputs] == f"./outputs:{outputs}"
    assert mounts[f"{workdir}/calibration"] == f"./calibration:{workdir}/calibration:ro"  # where the code reads it
    cache = [v for v in service["volumes"] if not v.startswith((".", "$"))]
    assert len(cache) == 1, cache
    name, target = cache[0].split(":")
    assert name in _compose()["volumes"] and _env()["HF_HOME"].startswith(target + "/")
    # the host's Hugging Face hub cache, read-only, where huggingface_hub looks for it (HF_HOME/hub)
    (host_cache,) = [v for v in service["volumes"] if v.startswith("$")]
    assert host_cache == "${REAPVLM_HF_CACHE:-~/.cache/huggingface/hub}:" + _env()["HF_HOME"] + "/hub:ro"
    runsh = (ROOT / "run.sh").read_text()
    assert 'REAPVLM_HF_CACHE="${HF_HUB_CACHE:-${HF_HOME:-$HOME/.cache/huggingface}/hub}"' in runsh


def test_image_label_covers_everything_the_image_copies():
    """run.sh rebuilds the image when the hash of these files differs from the image's label."""
    runsh = (ROOT / "run.sh").read_text()
    listed = re.search(r"^IMAGE_SOURCES=\((.*)\)$", runsh, re.M).group(1).split()
    copied = [src for op, args in _instructions() if op == "COPY" for src in args.split()[:-1]]
    assert sorted(listed) == sorted(["Dockerfile", *copied])
    (label,) = _service()["build"]["labels"]
    assert _service()["build"]["labels"][label] == "${REAPVLM_SOURCE:-}"
    assert f'.Config.Labels "{label}"' in runsh


# ---- .ci/run -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("selftest_rc", "ci_rc"), [(0, 0), (1, 1), (5, 1)])
def test_ci_runs_selftest_and_fails_when_no_test_ran(tmp_path, selftest_rc, ci_rc):
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    (tmp_path / "run.sh").write_text(f'#!/usr/bin/env bash\necho "run.sh $*"\nexit {selftest_rc}\n')
    (tmp_path / "run.sh").chmod(0o755)
    result = subprocess.run(["bash", ".ci/run"], cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode == ci_rc
    assert result.stdout.splitlines()[0] == "run.sh selftest"
    assert re.search(rf"exit code {ci_rc}, total time \d+m \d+s$", result.stdout.strip())
    assert ("collected no tests" in result.stderr) == (selftest_rc == 5)


def test_readme_test_command_is_the_one_ci_runs():
    assert "./run.sh selftest" in (ROOT / "README.md").read_text()
    assert "./run.sh selftest" in (ROOT / ".ci" / "run").read_text()
