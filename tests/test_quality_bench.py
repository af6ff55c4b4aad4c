"""bench/quality.py's plan list: the swap search's steps replayed from the greedy plan."""

from __future__ import annotations

import pytest

from bench import quality


def _table(swaps: list[dict], final: dict) -> dict:
    greedy = {"0.experts": [0, 1, 2], "1.experts": [0, 1, 2]}
    return {
        "plans": [greedy, final],
        "rows": [
            {"policy": "greedy", "ratio": 0.5, "plan_id": 0},
            {
                "policy": "swap",
                "ratio": 0.5,
                "plan_id": 1,
                "search": {"base": "greedy from reap/balanced", "swaps": swaps},
            },
        ],
    }


def test_swap_steps_replay_the_history_from_the_greedy_plan():
    swaps = [
        {"block": "1.experts", "out": 0, "in": 5, "objective": 0.3},
        {"block": "0.experts", "out": 2, "in": 4, "objective": 0.2},
    ]
    final = {"0.experts": [0, 1, 4], "1.experts": [1, 2, 5]}
    table = _table(swaps, final)
    steps = quality.swap_steps(table, table["rows"][1])
    assert [s["kept"] for s in steps] == [{"0.experts": [0, 1, 2], "1.experts": [1, 2, 5]}, final]
    assert [s["search_objective"] for s in steps] == [0.3, 0.2] and {s["kind"] for s in steps} == {"swap-step"}
    assert steps[0]["label"] == "swap step 1 (block 1.experts: 0 out, 5 in)"
    # a history that does not end at the search's plan is refused, not reported
    table = _table(swaps, {"0.experts": [0, 1, 3], "1.experts": [1, 2, 5]})
    with pytest.raises(RuntimeError, match="does not replay"):
        quality.swap_steps(table, table["rows"][1])
    # no steps: an exhaustive search, or one that started elsewhere
    table = _table([], final)
    assert quality.swap_steps(table, table["rows"][1]) == []
