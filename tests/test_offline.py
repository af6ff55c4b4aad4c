"""Safe defaults: the pipeline never touches the network, and remote code stays off unless asked for."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

GUARD = """
import socket
def _refuse(*args, **kwargs):
    raise RuntimeError("network access attempted")
socket.socket.connect = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
"""


def test_reap_prune_test_run_with_the_network_forbidden(tiny_vl_dir, tmp_path):
    guard = tmp_path / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(GUARD)  # every child interpreter refuses sockets
    env = {k: v for k, v in os.environ.items() if not k.startswith("REAP_")}
    env.update({"PYTHONPATH": f"{guard}:{ROOT}", "HF_HUB_OFFLINE": "1"})
    out = tmp_path / "out"
    common = ["--model-path", str(tiny_vl_dir), "--output-path", str(out), "--device", "cpu"]
    steps = [
        ["reap.py", *common, "--max-samples", "8", "--max-seq-len", "96", "--eval-samples", "4", "--no-plots"],
        ["prune_model.py", *common],
        ["test_pruned_model.py", *common, "--eval-samples", "4", "--max-new-tokens", "4", "--min-agreement", "0"],
    ]
    for step in steps:
        result = subprocess.run(
            [sys.executable, str(ROOT / step[0]), *step[1:]],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode in (0, 1), result.stderr[-2000:]  # 1 = the verdict, not a crash
        assert "network access attempted" not in result.stderr
    assert json.loads((out / "report" / "report.json").read_text())["samples"] == 4
    settings = json.loads((out / "reap_settings.json").read_text())["settings"]
    assert settings["trust_remote_code"] is False
