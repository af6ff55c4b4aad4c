"""Model paths as Hub repo ids, resolved from a pre-populated Hugging Face cache with HF_HUB_OFFLINE=1 (nothing
is downloaded), and the output guard: nothing is ever written into the cache."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, constants

from reap_vlm import hub
from reap_vlm.cli import main
from reap_vlm.errors import InputNotFoundError
from reap_vlm.prune import run as prune_run
from reap_vlm.reap import run as reap_run

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
REPO = "tiny-org/tiny-qwen3-vl-moe"


def populate_cache(hub_cache: Path, repo_id: str, src: Path, commit: str = COMMIT) -> Path:
    """The layout huggingface_hub writes: blobs named by their hash, a snapshot of links into them, refs/main."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    for path in sorted(src.rglob("*")):
        if not path.is_file():
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.relative_to(src)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def _tree(folder: Path) -> dict[str, str]:
    """Every entry under `folder` with its link target or content hash (what a write would change)."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_symlink():
            out[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


@pytest.fixture
def offline_cache(tmp_path, tiny_vl_dir, monkeypatch):
    """A Hugging Face cache holding REPO (the tiny Qwen3-VL-MoE), offline, for this process."""
    cache = tmp_path / "hf" / "hub"
    snapshot = populate_cache(cache, REPO, tiny_vl_dir)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return cache, snapshot


def test_repo_ids_are_told_from_paths():
    for text in ("Qwen/Qwen3-VL-30B-A3B-Instruct", "org/name@main", "org/name@v1.0", "a/b.c_d-e"):
        assert hub.is_repo_id(text), text
    for text in ("nowhere", "./org/name", "/abs/org/name", "org/name/extra", "org--x/name", "org/name.git", "o/.."):
        assert not hub.is_repo_id(text), text
    assert hub.cache_repo_id(Path("/c/hub/models--Qwen--Qwen3-VL-30B-A3B-Instruct/snapshots/abc")) == (
        "Qwen/Qwen3-VL-30B-A3B-Instruct"
    )
    assert hub.cache_repo_id(Path("/models/Qwen3-VL-30B-A3B-Instruct")) is None


def test_repo_id_resolves_to_the_cached_snapshot_offline(offline_cache, tmp_path):
    _cache, snapshot = offline_cache
    assert hub.resolve(Path(REPO), "REAP_MODEL_PATH") == snapshot
    assert hub.resolve(Path(f"{REPO}@{COMMIT}"), "REAP_MODEL_PATH") == snapshot
    assert hub.resolve(Path("nowhere"), "REAP_MODEL_PATH") == Path("nowhere")  # a path: the stage says it is missing
    with pytest.raises(InputNotFoundError, match=r"REAP_MODEL_PATH=other/model is not a local folder.*HF_HUB_OFFLINE"):
        hub.resolve(Path("other/model"), "REAP_MODEL_PATH")
    with pytest.raises(InputNotFoundError, match="hf download tiny-org/tiny-qwen3-vl-moe"):
        hub.resolve(Path(f"{REPO}@v2"), "REAP_MODEL_PATH")
    # a local folder of that name wins over the cache
    local = tmp_path / REPO
    shutil.copytree(snapshot, local, symlinks=False)
    assert hub.resolve(Path(REPO), "REAP_MODEL_PATH") == Path(REPO)


def test_reap_and_prune_read_a_hub_id_and_never_write_into_the_cache(offline_cache, tmp_path, capsys):
    cache, snapshot = offline_cache
    before = _tree(cache)
    out = tmp_path / "out"
    common = ["--model-path", REPO, "--output-path", str(out), "--device", "cpu"]
    reap = ["--scoring-mode", "router", "--max-samples", "8", "--max-seq-len", "64", "--eval-samples", "0"]
    assert main("reap", reap_run, [*common, *reap, "--calibration", "code", "--no-plots"]) == 0
    meta = json.loads((out / "reap_metadata.json").read_text())
    assert meta["model"]["path"] == str(snapshot)
    # outputs inside the cache are refused before any work: the pruned folder, the metadata, the output root
    inside = cache / "models--tiny-org--tiny-qwen3-vl-moe" / "pruned"
    capsys.readouterr()
    assert main("prune", prune_run, [*common, "--pruned-model-path", str(inside)]) == 2
    assert "the Hugging Face cache that holds that model" in capsys.readouterr().err
    assert main("prune", prune_run, [*common, "--pruned-model-path", str(cache.parent)]) == 2
    assert main("reap", reap_run, [*common, *reap, "--metadata-path", str(cache / "m" / "meta.json")]) == 2
    assert "inside the model folder" in capsys.readouterr().err
    assert main("prune", prune_run, common) == 0
    pruned = out / "pruned"
    assert json.loads((pruned / "config.json").read_text())["reap_pruning"]["source"]["path"] == str(snapshot)
    assert not any(p.is_symlink() for p in pruned.rglob("*"))  # the blobs' content is copied, not their links
    assert ModelCard.load(pruned / "README.md").data.base_model == REPO  # the card names the Hub source
    assert _tree(cache) == before


def test_hf_hub_offline_from_the_environment_is_honoured(tmp_path, tiny_vl_dir):
    """One child process with only HF_HOME and HF_HUB_OFFLINE set (huggingface_hub reads them at import):
    `reap-vlm verify` reads the cached snapshot, and a repo that is not cached is one line, exit code 2."""
    populate_cache(tmp_path / "hf" / "hub", REPO, tiny_vl_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REAP_", "HF_"))}
    env.update(PYTHONPATH=str(ROOT), HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    child = (
        "import sys; from reap_vlm.command import main; "
        f"print('rc', main(['verify', {REPO!r}, '--json']), flush=True); "
        "print('rc', main(['verify', 'no-org/absent']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", child], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    info, first, second = result.stdout.rsplit("rc ", 2)
    assert (first, second) == ("0\n", "2\n"), result.stdout + result.stderr
    assert json.loads(info)["model"].endswith(f"models--tiny-org--tiny-qwen3-vl-moe/snapshots/{COMMIT}")
    (line,) = result.stderr.strip().splitlines()
    assert "no-org/absent is not a local folder" in line and "HF_HUB_OFFLINE is set, so nothing is downloaded" in line
