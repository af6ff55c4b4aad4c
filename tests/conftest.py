"""Shared fixtures: tiny checkpoints are built once per session (they take about a second each)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def tiny_vl_dir(tmp_path_factory):
    from reap_vlm.tiny import make_tiny

    return make_tiny("qwen3_vl_moe", tmp_path_factory.mktemp("tiny") / "qwen3_vl_moe")


@pytest.fixture(scope="session")
def tiny_text_dir(tmp_path_factory):
    from reap_vlm.tiny import make_tiny

    return make_tiny("qwen3_moe", tmp_path_factory.mktemp("tiny") / "qwen3_moe")
