"""What users touch: every script's --help and one-line errors with exit code 2 (the demo: tests/test_demo.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args, cwd, **env):
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
    )


@pytest.mark.parametrize("script", ["reap.py", "prune_model.py", "test_pruned_model.py"])
def test_help_explains_every_option(script, tmp_path):
    result = _run([str(ROOT / script), "--help"], tmp_path)
    text = " ".join(result.stdout.split())  # help wraps at the terminal's width
    assert result.returncode == 0 and "[REAP_MODEL_PATH; default: not set]" in text
    assert "--output-path" in text and "[REAP_SEED; default: 42]" in text and "(default: None)" not in text


@pytest.mark.parametrize(
    ("script", "args", "env", "message"),
    [
        ("reap.py", [], {"REAP_PRUNE_RATO": "0.5"}, "did you mean REAP_PRUNE_RATIO?"),
        ("reap.py", ["--prune-ratio", "1.5"], {}, "REAP_PRUNE_RATIO=1.5 is out of range"),
        ("reap.py", [], {}, "REAP_MODEL_PATH is not set"),
        ("reap.py", ["--model-path", "nowhere"], {}, "model path nowhere does not exist"),
        ("prune_model.py", ["--model-path", "."], {}, "has no config.json"),
        ("test_pruned_model.py", ["--pruned-model-path", "nope"], {}, "pruned model nope does not exist"),
    ],
)
def test_user_errors_are_one_line_with_exit_2(script, args, env, message, tmp_path):
    result = _run([str(ROOT / script), *args], tmp_path, **env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_json_is_one_line_on_stdout_also_for_an_error(tmp_path, monkeypatch, capsys):
    import json

    from reap_vlm.cli import main
    from reap_vlm.reap import run

    monkeypatch.chdir(tmp_path)
    for key in [k for k in os.environ if k.startswith("REAP_")]:
        monkeypatch.delenv(key)
    assert main("reap", run, ["--json", "--quiet", "--prune-ratio", "1.5"]) == 2
    out, err = capsys.readouterr()
    (line,) = out.splitlines()
    result = json.loads(line)
    assert result["stage"] == "reap" and result["exit_code"] == 2 and "REAP_PRUNE_RATIO=1.5" in result["error"]
    assert err.strip().splitlines() == ["error: " + result["error"]]  # the human line stays on stderr
    assert list(tmp_path.iterdir()) == []


def test_all_takes_quiet_and_verbose_as_the_log_level():
    from reap_vlm.command import flags_to_settings

    assert flags_to_settings(["--verbose", "--json"]) == {"REAP_LOG_LEVEL": "verbose", "REAP_JSON": "true"}
    assert flags_to_settings(["--quiet", "--config", "r.yaml"]) == {"REAP_LOG_LEVEL": "quiet", "REAP_CONFIG": "r.yaml"}
