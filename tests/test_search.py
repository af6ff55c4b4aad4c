"""The swap search (candidates.swap_search, swap_plan): exact on a space it can enumerate, the optimum of a
separable objective, its evaluation budget honoured, and on a real tiny VLM it brings back an expert whose
removal hurts although its criterion score is low."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from reap_vlm import candidates, scoring
from reap_vlm.calibration import load_samples, make_batches
from reap_vlm.errors import PlanError
from reap_vlm.moe import find_moe_blocks
from reap_vlm.tiny import build

PIXELS = {"min_pixels": 1024, "max_pixels": 16384}


def _objective(seed: int, keys, experts: int, pairwise: float):
    """A synthetic objective over plans: per removed expert a cost, plus `pairwise` times a random cost for every
    pair of removed experts within a block and across the first two blocks (interactions)."""
    rng = random.Random(seed)
    single = {(k, j): rng.random() for k in keys for j in range(experts)}
    pairs = {
        (a, b): rng.random() * pairwise
        for a, b in itertools.combinations([(k, j) for k in keys for j in range(experts)], 2)
        if pairwise
    }

    def value(plan: dict) -> float:
        removed = [(k, j) for k in keys for j in range(experts) if j not in plan[k]]
        both = sum(pairs[p] for p in itertools.combinations(removed, 2)) if pairwise else 0.0
        return sum(single[r] for r in removed) + both

    return value


class Counting:
    """evaluate(plans) for swap_search that counts what it is asked: one per plan and one per call (the
    unpruned reference of a masked measurement), as search_evaluator does."""

    def __init__(self, value):
        self.value, self.calls, self.plans = value, 0, 0

    def __call__(self, plans):
        self.calls += 1
        self.plans += len(plans)
        return [self.value(p) for p in plans], len(plans) + 1


def _brute_force(value, keys, experts: int, keep: int) -> tuple[float, dict]:
    best = None
    for combo in itertools.product(*(itertools.combinations(range(experts), keep) for _ in keys)):
        plan = {k: list(c) for k, c in zip(keys, combo, strict=True)}
        v = value(plan)
        if best is None or v < best[0]:
            best = (v, plan)
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exhaustive_when_the_space_fits_the_budget_equals_brute_force(seed):
    keys, experts, keep = ["0.experts", "1.experts"], 5, 3  # C(5, 3)^2 = 100 plans
    value = _objective(seed, keys, experts, pairwise=0.5)
    start = {k: [0, 1, 2] for k in keys}
    evaluate = Counting(value)
    plan, info = candidates.swap_search(
        evaluate, start, dict.fromkeys(keys, experts), budget=101, min_keep=dict.fromkeys(keys, 2)
    )
    best_value, best_plan = _brute_force(value, keys, experts, keep)
    assert info["mode"] == "exhaustive" and info["plans"] == 100 and info["evaluations"] == 101
    assert plan == best_plan and info["objective"] == pytest.approx(best_value, abs=0)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_swaps_reach_the_optimum_of_a_separable_objective(seed):
    """Without interactions the screening's estimate of a swap is exact, so the search ends at the optimum
    (keep the experts whose removal costs most) from any start, inside a budget below the space."""
    keys, experts, keep = ["0.experts", "1.experts"], 8, 4  # 70^2 plans
    value = _objective(seed, keys, experts, pairwise=0.0)
    rng = random.Random(seed)
    start = {k: sorted(rng.sample(range(experts), keep)) for k in keys}
    evaluate = Counting(value)
    plan, info = candidates.swap_search(
        evaluate, start, dict.fromkeys(keys, experts), budget=1000, min_keep=dict.fromkeys(keys, 2)
    )
    best_value, best_plan = _brute_force(value, keys, experts, keep)
    assert info["mode"] == "swap" and info["local_optimum"]
    assert plan == best_plan and info["objective"] == pytest.approx(best_value)
    assert info["evaluations"] == evaluate.plans + evaluate.calls <= 1000
    # every accepted swap improved the objective, and the history replays to the result
    replay = {k: list(v) for k, v in start.items()}
    last = value(start)
    for step in info["swaps"]:
        replay[step["block"]] = sorted([x for x in replay[step["block"]] if x != step["out"]] + [step["in"]])
        assert step["objective"] == pytest.approx(value(replay)) and step["objective"] < last
        last = step["objective"]
    assert replay == plan


@pytest.mark.parametrize("budget", [2, 29, 30, 31, 43, 44, 47, 60, 150, 400])
def test_the_budget_is_never_exceeded(budget):
    """A turn over both blocks: the start (1 + 1) and a screened step per block (8 + 1 + 4 + 1) = 30."""
    keys, experts = ["0.experts", "1.experts"], 8
    value = _objective(7, keys, experts, pairwise=0.3)
    start = {k: [0, 1, 2, 3] for k in keys}
    evaluate = Counting(value)
    if budget < 30:
        with pytest.raises(PlanError, match="one step in every block") as err:
            candidates.swap_search(
                evaluate, start, dict.fromkeys(keys, experts), budget=budget, min_keep=dict.fromkeys(keys, 2)
            )
        assert "takes 30 evaluations" in err.value.why and evaluate.calls == 0  # refused before measuring
        return
    plan, info = candidates.swap_search(
        evaluate, start, dict.fromkeys(keys, experts), budget=budget, min_keep=dict.fromkeys(keys, 2)
    )
    assert evaluate.plans + evaluate.calls == info["evaluations"] <= budget
    assert all(len(plan[k]) == 4 and len(set(plan[k])) == 4 for k in keys)
    assert value(plan) <= value(start) and info["objective"] == pytest.approx(value(plan))
    assert info["block_steps"] >= 2  # at least the turn over both blocks


def test_no_drop_below_min_keep_and_too_small_a_budget_is_refused():
    keys, experts = ["0.experts"], 6
    value = _objective(3, keys, experts, pairwise=0.2)
    start = {"0.experts": [0, 1]}
    seen = []

    def evaluate(plans):
        seen.extend(plans)
        return [value(p) for p in plans], len(plans) + 1

    # C(6, 2) = 15 plans do not fit 14 evaluations: swaps; with 2 kept and min_keep 2 no drop is screened, every
    # one of the 2 x 4 swaps is measured instead (start 1 + 1, a block step 8 + 1; a second step would not fit)
    _, info = candidates.swap_search(evaluate, start, {"0.experts": experts}, budget=14, min_keep={"0.experts": 2})
    assert info["mode"] == "swap" and info["evaluations"] == 11 and info["block_steps"] == 1
    assert all(len(p["0.experts"]) == 2 for p in seen) and len(seen) == 9
    with pytest.raises(PlanError, match="budget"):
        candidates.swap_search(evaluate, start, {"0.experts": 16}, budget=1, min_keep={"0.experts": 2})
    # 128 experts keeping 64 in each of 48 blocks: one turn is 48 x (128 + 1 + 4 + 1) + 2 evaluations
    big = {f"{b}.experts": list(range(64)) for b in range(48)}
    with pytest.raises(PlanError, match="one step in every block") as err:
        candidates.swap_search(evaluate, big, dict.fromkeys(big, 128), budget=200, min_keep=dict.fromkeys(big, 8))
    assert f"takes {48 * 134 + 2} evaluations" in err.value.why


# ---- on a real tiny VLM ----------------------------------------------------------------------------


def _meta(blocks, stats) -> dict:
    return {
        "model": {
            "blocks": [
                {
                    "key": b.key,
                    "layer": b.layer,
                    "expert_set": b.expert_set,
                    "num_experts": b.num_experts,
                    "top_k": b.top_k,
                }
                for b in blocks
            ]
        },
        "layers": {b.key: {"stats": stats[b.key]} for b in blocks},
    }


@pytest.mark.parametrize(("keep", "budget", "mode"), [(7, 60, "exhaustive"), (6, 25, "swap")])
def test_swap_search_brings_back_an_expert_whose_removal_hurts_but_whose_score_is_low(keep, budget, mode):
    """The most rarely routed expert of the first block gets outputs 40 times larger: measured, removing it hurts
    more than removing any other; the frequency criterion (its count is unchanged) still drops it when that block
    keeps `keep` of its 8 experts; the search from that plan takes it back, by measurement: all C(8, 7) = 8 plans
    measured within 60 evaluations, or swaps, C(8, 6) = 28 plans not fitting 25 evaluations."""
    from reap_vlm.observe import Observer

    model, processor = build("qwen3_vl_moe", seed=3)
    blocks = find_moe_blocks(model)
    samples = load_samples("code:3,writing:2,vision:3", max_samples=8, seed=1)
    batches = list(make_batches(samples, processor, max_seq_len=64, batch_size=4, **PIXELS))
    first = blocks[0]
    with Observer(model, blocks, "routed") as obs, torch.inference_mode():
        for b in batches:
            obs.set_modality(b.modality)
            model(**b.inputs)
    stats = obs.export()
    counts = stats[first.key]["all"]["count"]
    rare = min((c, j) for j, c in enumerate(counts) if c > 0)[1]
    with torch.no_grad():
        model.get_submodule(first.experts).down_proj[rare] *= 40.0
    evaluate = candidates.search_evaluator(model, blocks, batches)
    full = {b.key: list(range(b.num_experts)) for b in blocks}
    drops, _ = evaluate([{**full, first.key: [x for x in full[first.key] if x != j]} for j in full[first.key]])
    assert max(range(len(drops)), key=drops.__getitem__) == rare  # removing it hurts most
    assert drops[rare] > 2 * sorted(drops)[-2]
    base, _ = scoring.select(
        stats[first.key], criterion="frequency", n_keep=keep, modality="joint", protect_super=False
    )
    start = {**full, first.key: sorted(base)}
    assert rare not in start[first.key]  # the criterion drops it
    kept, info = candidates.swap_plan(
        model, blocks, _meta(blocks, stats), batches, start=start, start_label="frequency/joint", budget=budget
    )
    assert rare in kept[first.key] and len(kept[first.key]) == keep
    assert kept[blocks[1].key] == full[blocks[1].key]  # nothing to swap in a block that keeps every expert
    assert info["mode"] == mode and info["evaluations"] <= budget and info["base"] == "frequency/joint"
    (before, after), _ = evaluate([start, kept])
    assert after == pytest.approx(info["objective"]) and after < before / 2


def test_a_negative_budget_is_refused_in_one_line():
    from reap_vlm.errors import SettingsError
    from reap_vlm.settings import ReapSettings, load

    with pytest.raises(SettingsError, match="REAP_SEARCH_BUDGET must be >= 0"):
        load(ReapSettings, ["--model-path", "m", "--search-budget", "-1"], {})
    assert load(ReapSettings, ["--model-path", "m", "--search-budget", "0"], {}).search_budget == 0


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_search_slice_that_is_not_a_finite_positive_share_is_refused_in_one_line(value):
    from reap_vlm.errors import SettingsError
    from reap_vlm.settings import ReapSettings, load

    with pytest.raises(SettingsError, match="REAP_SEARCH_SLICE must be a finite number > 0"):
        load(ReapSettings, ["--model-path", "m", "--search-slice", value], {})
    assert load(ReapSettings, ["--model-path", "m", "--search-slice", "1.0"], {}).search_slice == 1.0


def test_the_swap_search_finds_the_same_plan_in_memory_and_streamed(tiny_vl_dir, tmp_path):
    """Streamed execution measures every plan one decoder layer at a time with the same rows: the swap search
    takes the same steps and ends at the same plan, within the same budget."""
    from reap_vlm.execution.stream import StreamedModel
    from reap_vlm.loading import load_model
    from reap_vlm.reap import score
    from reap_vlm.settings import ReapSettings, load

    argv = ["--model-path", str(tiny_vl_dir), "--output-path", str(tmp_path), "--device", "cpu", "--max-samples"]
    settings = load(ReapSettings, [*argv, "9", "--max-seq-len", "96", "--eval-samples", "0", "--no-plots"], {})
    meta = score(settings)  # the statistics the plans are cut from
    model, processor, _ = load_model(tiny_vl_dir, device="cpu")
    samples = load_samples("code:2,vision:2", max_samples=4, seed=0)
    batches = list(make_batches(samples, processor, answers=True, max_seq_len=64, batch_size=2, **PIXELS))
    streamed = StreamedModel(tiny_vl_dir, device="cpu")
    found = []
    for driver in (model, streamed):
        blocks = find_moe_blocks(model if driver is model else streamed.model)
        table = candidates.measure_plans(
            driver,
            blocks,
            meta,
            batches,
            criteria=("reap",),
            ratios=[0.5],
            modality="balanced",
            random_seeds=(),
            search_batches=batches,
            greedy_base="reap/balanced",
            search_budget=60,
        )
        (swap,) = [r for r in table["rows"] if r["policy"] == "swap"]
        found.append((table["plans"][swap["plan_id"]], swap["search"]))
    streamed.close()
    (memory_plan, memory), (stream_plan, stream) = found
    assert memory_plan == stream_plan and memory["evaluations"] == stream["evaluations"] <= 60
    assert [(s["block"], s["out"], s["in"]) for s in memory["swaps"]] == [
        (s["block"], s["out"], s["in"]) for s in stream["swaps"]
    ]
    assert memory["objective"] == pytest.approx(stream["objective"], rel=1e-5)


def test_the_search_slice_is_a_share_of_the_selection_slice_from_the_calibration_split():
    """REAP_SEARCH_SLICE scales the plan-selection slice's counts per task, per source and in all (default half:
    4 questions per task, 2 samples per source, at most 48); the rows come from the calibration split, never from
    the evaluation split's selection portion."""
    from collections import Counter

    from reap_vlm.calibration import selection_slice, slice_group
    from reap_vlm.errors import SettingsError
    from reap_vlm.settings import ReapSettings, load

    def settings(*extra):
        return load(ReapSettings, ["--model-path", "m", "--calibration", "combined", *extra], {})

    default = candidates.search_samples(settings())
    reference = selection_slice("combined", per_task=4, per_source=2, max_samples=48, seed=42, split="calibration")
    assert [s.id for s in default] == [s.id for s in reference] and len(default) == 48
    whole = candidates.search_samples(settings("--search-slice", "1.0", "--eval-samples", "500"))
    counts = Counter(slice_group(s) for s in whole)
    tasks = {g: n for g, n in counts.items() if g.startswith("tasks/")}
    assert len(tasks) == 7 and set(tasks.values()) == {8}  # REAP_EVAL_PER_TASK questions of every task
    assert {counts[g] for g in ("code", "general", "math", "writing")} == {4}  # REAP_EVAL_PER_SOURCE
    selection = {s.id for s in candidates.heldout_samples(settings("--eval-samples", "500"))}
    assert selection and not selection & {s.id for s in whole}
    with pytest.raises(SettingsError, match="REAP_SEARCH_SLICE must be a finite number > 0"):
        settings("--search-slice", "0")


def test_the_swap_search_under_tv_answers_finds_the_brute_force_optimum_on_a_tiny_vlm():
    """REAP_OBJECTIVE=tv_answers reaches the search: every plan keeping 7 of the first block's 8 experts fits the
    budget, so the search measures them all; its plan is the one whose objective — computed here from the masked
    rows by the definition (answer tokens: 1 − overlap; text: KL; per group, modality, then the mean) — is lowest."""
    model, processor = build("qwen3_vl_moe", seed=3)
    blocks = find_moe_blocks(model)
    samples = load_samples("code:2,vision:4", max_samples=6, seed=1)
    batches = list(make_batches(samples, processor, answers=True, max_seq_len=64, batch_size=3, **PIXELS))
    first = blocks[0]
    full = {b.key: list(range(b.num_experts)) for b in blocks}
    plans = [{**full, first.key: [x for x in full[first.key] if x != j]} for j in full[first.key]]
    _, rows, _ = candidates._run_plans(model, blocks, batches, plans, usage=False)
    assert any(r["answer_tokens"] for r in rows[0])  # the vision rows' reference answers are targets

    def objective(plan_rows):
        sums: dict = {}
        for r in plan_rows:
            group = (r["kind"], f"{r['source']}/{r['task']}" if r.get("task") else r["source"])
            answered = r["answer_tokens"] > 0
            value = r["answer_tokens"] - r["answer_overlap"] if answered else r["kl"]
            total = sums.setdefault(group, [0.0, 0.0])
            total[0] += value
            total[1] += r["answer_tokens"] if answered else r["tokens"]
        kinds = sorted({k for k, _ in sums})
        return sum(
            sum(v / t for (k, _), (v, t) in sums.items() if k == kind) / sum(1 for k, _ in sums if k == kind)
            for kind in kinds
        ) / len(kinds)

    values = [objective(r) for r in rows]
    kept, info = candidates.swap_plan(
        model,
        blocks,
        _meta(blocks, {b.key: {} for b in blocks}),
        batches,
        start=plans[0],
        start_label="test",
        budget=20,
        measure="tv_answers",
    )
    assert info["mode"] == "exhaustive" and info["plans"] == 8
    assert kept == plans[min(range(8), key=values.__getitem__)]
    assert info["objective"] == pytest.approx(min(values))
