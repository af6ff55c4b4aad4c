"""Container packaging: hadolint, shellcheck, the compose file's structure, the Dockerfile's rules."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _tool(name: str) -> str:
    found = BIN / name if (BIN / name).exists() else shutil.which(name)
    assert found, f"{name} is part of requirements-dev.txt"
    return str(found)


def test_hadolint_passes():
    result = subprocess.run([_tool("hadolint"), "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_shellcheck_passes():
    result = subprocess.run([_tool("shellcheck"), "run.sh", ".ci/run"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_rules():
    text = (ROOT / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base.startswith("nvidia/cuda:") and re.search(r":\d+\.\d+\.\d+-", base), "pinned CUDA base"
    import torch

    cuda = torch.version.cuda  # the pinned torch wheel's CUDA must match the base image
    if cuda:
        assert base.split(":")[1].startswith(cuda), (base, cuda)
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0", "0:0")
    lines = text.splitlines()
    req = next(i for i, line in enumerate(lines) if line.startswith("COPY requirements.txt"))
    install = next(i for i, line in enumerate(lines) if "pip install -r requirements.txt" in line)
    code = next(i for i, line in enumerate(lines) if line.startswith("COPY") and "reap_vlm" in line)
    assert req < install < code, "dependencies are installed before the code is copied"
    assert "HF_HOME=/cache/huggingface" in text and "ENTRYPOINT" in text
    assert not re.search(r"(?i)(token|secret|password)\s*=", text)
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".venv", ".git", "outputs", ".env"} <= set(ignored)


def test_compose_structure():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["reap-vlm"]
    assert service["build"] == "."
    assert service["env_file"] == [{"path": "${REAP_ENV_FILE:-.env}", "required": False}]
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device == {"driver": "nvidia", "count": "${REAP_GPUS:-all}", "capabilities": ["gpu"]}
    volumes = service["volumes"]
    assert "./models:/models" in volumes and "./outputs:/app/outputs" in volumes
    assert "./calibration:/app/calibration:ro" in volumes
    assert any(v.startswith("hf-cache:") for v in volumes) and "hf-cache" in compose["volumes"]
    assert service["shm_size"] == "16gb" and service["user"] != "root"


def test_ci_calls_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "./run.sh selftest" in readme and "./run.sh selftest" in ci
    assert "./run.sh demo" in readme
