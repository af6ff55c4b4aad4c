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


@pytest.fixture
def one_pass(monkeypatch):
    """The StreamedModel of every streamed run (scoring, or the test stage's two models in the order they are
    closed), kept for its reader's and driver's counters."""
    from reap_vlm.execution import stream

    made: list = []
    close = stream.StreamedModel.close

    def keep(self) -> None:
        made.append(self)
        close(self)

    monkeypatch.setattr(stream.StreamedModel, "close", keep)
    return made
