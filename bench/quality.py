"""What pruning keeps, measured on written checkpoints: every criterion × modality policy × ratio, the greedy
and swap searches, the `auto` choice and three random plans, each pruned by the prune stage and evaluated with
the test stage's metrics.

For every ratio the reap stage runs once with the given settings (default: the built-in calibration,
REAP_CRITERION=auto); its metadata holds the raw sums, the auto plan, the greedy and swap plans and the random
plans. Then, for every plan:
  criterion × policy   the prune stage re-cuts it from the raw sums (--criterion C --modality P --prune-ratio R)
  auto                 the prune stage writes the metadata's plan as it is
  greedy, swap, random the prune stage writes the plan from a copy of the metadata whose kept lists are that plan
  oracle               (--oracle-budget N) the swap search from the greedy plan run on the evaluation rows
                       themselves: what a uniform plan found by this search reaches when it may see the rows it
                       is judged on; a reference, never a plan the reap stage could choose
Every distinct plan is written once (identical plans share the checkpoint) and evaluated with the test
stage's functions (reap_vlm.evaluate): the log-perplexity ratio ln(ppl_pruned / ppl_original) per text
domain (compare) and the exact-match accuracy of greedy answers per image task (generate). The original's
numbers are measured once. The evaluation samples never include the reap stage's held-out slice (which
chose the auto plan) nor its calibration samples.

Usage:
  python bench/quality.py --model-path reap_vlm/demo_vlm --workdir /tmp/quality --out quality.json \\
      [--ratios 0.25,0.5,0.75] [--per-task 20] [--per-domain 8] [--markdown quality.md] [-- reap flags...]
Runs on the CPU; the model is evaluated in float32.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from reap_vlm import candidates, evaluate, metadata, prune, scoring  # noqa: E402
from reap_vlm.calibration import TEXT_SETS, load_samples, read_source  # noqa: E402
from reap_vlm.candidates import heldout_samples  # noqa: E402
from reap_vlm.errors import PlanError  # noqa: E402
from reap_vlm.loading import load_model  # noqa: E402
from reap_vlm.reap import score  # noqa: E402
from reap_vlm.settings import MODALITY_POLICIES, PruneSettings, ReapSettings, TestSettings, load  # noqa: E402

COMMON = ["--device", "cpu", "--dtype", "float32"]


def _quiet(fn, *args, **kwargs):
    """Run a stage with its printout kept in a string (returned beside the result)."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        result = fn(*args, **kwargs)
    return result, buffer.getvalue()


def eval_samples(args, reap_settings: ReapSettings) -> list:
    """Text domains and image tasks from the test portion of the evaluation split (or a JSONL), minus every
    sample the reap stage saw: its calibration samples and the plan-selection slice that chose the plan (which
    comes from the evaluation split's other portion, so none of it is in the test portion)."""
    seen = {s.id for s in heldout_samples(reap_settings)}
    seen |= {
        s.id
        for s in load_samples(
            reap_settings.calibration,
            "calibration",
            max_samples=reap_settings.max_samples,
            seed=reap_settings.seed,
            image_share=reap_settings.image_share,
        )
    }
    if args.eval_data != "builtin":
        pool = list(read_source(args.eval_data, "calibration")) + list(read_source(args.eval_data, "evaluation"))
        sources = sorted({s.source for s in pool})
    else:
        sources = [*TEXT_SETS, *args.image_sets.split(",")]
        pool = [s for name in sources for s in read_source(name, "test")]
    out = []
    counts: dict[str, int] = {}
    for s in pool:
        if s.id in seen:
            continue
        key = (s.task or s.source) if s.answer.strip() else s.source
        limit = args.per_task if s.answer.strip() else args.per_domain
        if counts.get(key, 0) < limit:
            counts[key] = counts.get(key, 0) + 1
            out.append(s)
    return out


def measure(model, processor, samples, tset: TestSettings, generate: bool, batches: list | None = None) -> dict:
    """The test stage's metrics of one model: text log-perplexity per domain and, per image task, the exact
    match of the answer with teacher forcing (compare: the model's top-1 is the reference token at every
    answer position, which is when greedy decoding reproduces it token for token) and, with `generate`, the
    exact match of greedy generations (generate: normalised text comparison, as the test stage's verdict)."""
    metrics = evaluate.compare(model, None, processor, samples, tset, batches)
    out = {
        "log_ppl": {d: math.log(m["ppl_pruned"]) for d, m in metrics["text_by_source"].items() if m.get("tokens")},
        "tf_accuracy": {t: e["teacher_forced_accuracy_pruned"] for t, e in metrics["answers_by_task"].items()},
        "samples": {t: e["samples"] for t, e in metrics["answers_by_task"].items()},
    }
    if generate:
        answered = [s for s in samples if s.answer.strip()]
        tasks = evaluate.task_accuracy(evaluate.generate(model, processor, answered, tset.max_new_tokens, tset))
        out["accuracy"] = {t: e["accuracy_pruned"] for t, e in tasks.items()}
    return out


def _signature(keep: dict) -> tuple:
    return tuple((k, tuple(v)) for k, v in sorted(keep.items()))


def plans_for_ratio(meta: dict, ratio: float, measured: bool = True, merges: tuple = ((16, "centroid"),)) -> list[dict]:
    """Every plan to write at this ratio: (label, kind, how) with the kept experts per block key. `measured`: the
    metadata's plan was chosen at this ratio by the candidate table (auto, greedy and random plans from it); else
    (--score-once) the metadata holds the raw sums only, and the random plans are drawn here with the reap
    stage's own function and seeds (candidates.random_plan, RANDOM_SEEDS). `merges`: the (REAM group size C,
    router mode) of every merge plan, written when the metadata has merge statistics."""
    blocks = meta["model"]["blocks"]
    mode = meta["scoring"]["mode"]
    plan = meta["plan"]
    out = []
    if measured:
        merged = "merge of " if plan.get("method") == "merge" else ""
        out.append(
            {
                "label": f"auto ({merged}{plan['criterion']}/{plan['policy']})",
                "kind": "auto",
                "kept": {b["key"]: meta["layers"][b["key"]]["kept"] for b in blocks},
            }
        )
    else:
        for seed in candidates.RANDOM_SEEDS:
            kept = candidates.random_plan(blocks, ratio=ratio, num_keep=0, round_to=plan.get("round_to", 1), seed=seed)
            out.append({"label": f"random (seed {seed})", "kind": "random", "kept": kept})
    for criterion in scoring.available_criteria(mode):
        for policy in MODALITY_POLICIES:
            try:
                cut = scoring.plan(
                    meta["layers"],
                    blocks,
                    criterion=criterion,
                    ratio=ratio,
                    num_keep=0,
                    modality=policy,
                    round_to=plan.get("round_to", 1),
                    protect_super=plan.get("protect_super_experts", True),
                    super_factor=plan.get("super_expert_factor", 10.0),
                )
            except PlanError as err:  # a plan that cannot be cut is reported, not fatal
                print(f"  {criterion}/{policy}: skipped ({err})")
                continue
            out.append(
                {
                    "label": f"{criterion}/{policy}",
                    "kind": "recut",
                    "criterion": criterion,
                    "policy": policy,
                    "kept": {k: v["kept"] for k, v in cut.items()},
                }
            )
    table = meta.get("candidates") or {}
    for row in table.get("rows", []):
        if row["ratio"] != ratio or row["policy"] not in ("greedy", "swap", "random"):
            continue
        label = row["policy"] if row["policy"] != "random" else f"random (seed {row['seed']})"
        out.append({"label": label, "kind": row["policy"], "kept": table["plans"][row["plan_id"]]})
        if row["policy"] == "swap":
            out += swap_steps(table, row)
    if meta.get("merge_stats"):  # REAM merging from the same saliency as the auto plan (prune_model.py --method merge)
        base = f"{plan['criterion']}/{plan.get('modality', plan['policy'])}"
        for group_size, router in merges:
            out.append(
                {
                    "label": f"merge (REAM C {group_size}, {router} router, {base})",
                    "kind": "merge",
                    "group_size": group_size,
                    "router": router,
                    "kept": {},
                }
            )
    order = {"auto": 0, "merge": 0.5, "random": 1, "greedy": 2, "swap": 2.5, "swap-step": 2.6}
    return sorted(out, key=lambda e: order.get(e["kind"], 4 if e.get("criterion") != "reap" else 3))


def swap_steps(table: dict, swap: dict) -> list[dict]:
    """The plan after each accepted step of the swap search (kind "swap-step"), replayed from its start (the
    greedy plan of the same ratio, which its search info names as its base) by its history; none when it
    started elsewhere or measured every plan at once."""
    greedy = next((r for r in table["rows"] if r["policy"] == "greedy" and r["ratio"] == swap["ratio"]), None)
    if greedy is None or not swap["search"]["base"].startswith("greedy from") or not swap["search"].get("swaps"):
        return []
    kept = {k: list(v) for k, v in table["plans"][greedy["plan_id"]].items()}
    out = []
    for n, step in enumerate(swap["search"]["swaps"], 1):
        kept = {**kept, step["block"]: sorted([x for x in kept[step["block"]] if x != step["out"]] + [step["in"]])}
        label = f"swap step {n} (block {step['block']}: {step['out']} out, {step['in']} in)"
        out.append({"label": label, "kind": "swap-step", "kept": kept, "search_objective": step["objective"]})
    if kept != table["plans"][swap["plan_id"]]:
        raise RuntimeError("the swap search's history does not replay to its plan")
    return out


def write_plan(entry: dict, meta_path: Path, meta: dict, model_path: str, target: Path, ratio: float) -> str:
    """The prune stage writes this plan to `target`; returns its printout."""
    argv = ["--model-path", model_path, "--pruned-model-path", str(target), "--output-path", str(target.parent)]
    if entry["kind"] == "recut":
        argv += ["--metadata-path", str(meta_path), "--prune-ratio", str(ratio)]
        argv += ["--criterion", entry["criterion"], "--modality", entry["policy"]]
    elif entry["kind"] == "auto":
        argv += ["--metadata-path", str(meta_path)]
    elif entry["kind"] == "merge":  # the groups' centroids are the kept experts: known once written
        argv += ["--metadata-path", str(meta_path), "--method", "merge", "--prune-ratio", str(ratio)]
        argv += ["--merge-group-size", str(entry["group_size"]), "--merge-router", entry["router"]]
    else:  # a measured plan the raw sums cannot reproduce: a copy of the metadata that holds it
        variant = copy.deepcopy(meta)
        for key, kept in entry["kept"].items():
            variant["layers"][key]["kept"] = list(kept)
            variant["layers"][key]["protected"] = {}
        variant["plan"].update(criterion=entry["kind"], policy=entry["kind"], chosen_by=f"bench: {entry['label']}")
        path = target.parent / f"{target.name}.reap_metadata.json"
        metadata.write(path, variant)
        argv += ["--metadata-path", str(path)]
    code, log = _quiet(prune.run, load(PruneSettings, argv, {}))
    if code != 0:
        raise RuntimeError(f"prune stage exited {code} for {entry['label']}:\n{log}")
    written = json.loads((target / "config.json").read_text())["reap_pruning"]["kept"]
    by_key = {f"{b['layer']}.{b['expert_set']}": b["key"] for b in meta["model"]["blocks"]}
    if entry["kind"] == "merge":
        entry["kept"] = {by_key[k]: v for k, v in written.items()}
    if {by_key[k]: v for k, v in written.items()} != {k: list(v) for k, v in entry["kept"].items()}:
        raise RuntimeError(f"the prune stage wrote another plan than {entry['label']}")
    return log


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=str(ROOT / "reap_vlm" / "demo_vlm"))
    parser.add_argument("--workdir", default="quality-work", help="Folder for metadata and pruned checkpoints.")
    parser.add_argument("--out", default="quality.json")
    parser.add_argument("--markdown", default="", help="Also write the tables as markdown to this file.")
    parser.add_argument("--ratios", default="0.25,0.5,0.75")
    parser.add_argument("--eval-data", default="builtin", help="'builtin' or a JSONL with held-out rows.")
    parser.add_argument("--image-sets", default="tasks", help="Built-in image sets evaluated (comma-separated).")
    parser.add_argument("--per-task", type=int, default=20, help="Image questions per task.")
    parser.add_argument("--per-domain", type=int, default=8, help="Text samples per domain.")
    parser.add_argument("--keep-checkpoints", action="store_true")
    parser.add_argument(
        "--only",
        default="",
        help="Measure only these plan kinds (auto,random,greedy,swap,swap-step,recut,merge,oracle) or labels "
        "(e.g. reap/balanced); swap-step: the plan after each accepted step of the swap search.",
    )
    parser.add_argument(
        "--merge-group-sizes", default="16", help="REAM group sizes C of the merge plans (0 = nearest)."
    )
    parser.add_argument(
        "--merge-routers",
        default="centroid",
        help="Router rows of the merge plans, comma-separated: centroid, average.",
    )
    parser.add_argument(
        "--oracle-budget",
        type=int,
        default=0,
        help="Also run the swap search from the greedy plan directly on the evaluation samples, with this many "
        "evaluations (0 = off): the best this search reaches when it sees the rows it is judged on. An upper "
        "reference for what a uniform plan can do, never a plan the reap stage could choose.",
    )
    parser.add_argument(
        "--oracle-rows",
        default="all",
        choices=("all", "text"),
        help="The evaluation rows the oracle's search sees: all, or only the text rows (its objective is then the "
        "text KL alone: how close to the original text a uniform plan can get, whatever the images lose).",
    )
    parser.add_argument(
        "--generate", default="auto,random", help="Plan kinds whose greedy generations are also scored."
    )
    parser.add_argument(
        "--score-once",
        action="store_true",
        help="Run the reap stage once, scoring only (no candidate table: no auto or greedy plan), and cut every "
        "ratio from its raw sums; random plans drawn with the reap stage's seeds. For the criterion x policy grid.",
    )
    parser.add_argument("reap_args", nargs="*", help="Extra flags for the reap stage (after --).")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    base_reap = load(ReapSettings, ["--model-path", args.model_path, *COMMON, *args.reap_args], {})
    tset = load(TestSettings, ["--model-path", args.model_path, "--batch-size", "16", *COMMON], {})
    samples = eval_samples(args, base_reap)
    model, processor, _ = load_model(args.model_path, device="cpu", dtype="float32")
    print(f"evaluation: {len(samples)} samples ({sum(bool(s.answer.strip()) for s in samples)} image questions)")
    batches = evaluate.encode(samples, processor, tset)  # encoded once: every checkpoint reads the same inputs
    t0 = time.perf_counter()
    cache = work / "original.json"  # the original's numbers, reused by a rerun with the same evaluation set
    key = {"model": args.model_path, "samples": [s.id for s in samples]}
    cached = json.loads(cache.read_text()) if cache.is_file() else {}
    if cached.get("key") == key:
        original = cached["original"]
    else:
        original = measure(model, processor, samples, tset, generate=True, batches=batches)
        cache.write_text(json.dumps({"key": key, "original": original}) + "\n")
    print(f"original measured in {time.perf_counter() - t0:.0f} s: {original}", flush=True)
    del model

    results = {
        "model": args.model_path,
        "command": "python bench/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "original": original,
        "evaluation": {"samples": len(samples), "per_task": args.per_task, "per_domain": args.per_domain},
        "ratios": {},
    }
    scored = None  # (meta, metadata path, seconds) of the one reap stage with --score-once
    merges = tuple(
        (int(c), r) for c in args.merge_group_sizes.split(",") for r in args.merge_routers.split(",") if c and r
    )
    for ratio in [float(r) for r in args.ratios.split(",")]:
        out_dir = work / f"r{ratio:g}"
        if args.score_once:
            if scored is None:
                scored = _reap(args, work / "scored", ratio, ["--eval-samples", "0"])
                print(f"reap stage (scoring only, once) {scored[2]:.0f} s")
            meta, meta_path, reap_seconds = scored
            plans = plans_for_ratio(meta, ratio, measured=False, merges=merges)
        else:
            meta, meta_path, reap_seconds = _reap(args, out_dir, ratio, ["--eval-ratios", f"{ratio:g}"])
            print(f"ratio {ratio}: reap stage {reap_seconds:.0f} s; {meta['plan']['chosen_by']}")
            plans = plans_for_ratio(meta, ratio, merges=merges)
            if args.oracle_budget > 0:
                plans.append(oracle_plan(args, meta, samples, base_reap))
        written: dict[tuple, dict] = {}
        rows = []
        for entry in plans:
            if args.only and not {entry["kind"], entry["label"]} & set(args.only.split(",")):
                continue
            merged = entry["kind"] == "merge"
            sig = ("merge", entry["group_size"], entry["router"]) if merged else _signature(entry["kept"])
            if sig not in written:
                target = out_dir / "plans" / f"p{len(written):03d}"
                if target.exists():
                    shutil.rmtree(target)
                t0 = time.perf_counter()
                write_plan(entry, meta_path, meta, args.model_path, target, ratio)
                pruned, _, _ = load_model(target, device="cpu", dtype="float32")
                measured = measure(
                    pruned, processor, samples, tset, entry["kind"] in args.generate.split(","), batches=batches
                )
                del pruned
                written[sig] = {"id": len(written), "first": entry["label"], **measured}
                written[sig]["seconds"] = round(time.perf_counter() - t0, 1)
                if not args.keep_checkpoints:
                    shutil.rmtree(target)
                print(f"  {entry['label']}: {_line(measured, original)}", flush=True)
            m = written[sig]
            rows.append({"label": entry["label"], "kind": entry["kind"], "checkpoint": m["id"], **_row(m, original)})
            if "search" in entry:
                rows[-1]["search"] = entry["search"]
            if "search_objective" in entry:  # a swap step: its objective on the search slice
                rows[-1]["search_objective"] = entry["search_objective"]
            results["ratios"][f"{ratio:g}"] = {  # after every plan: an interrupted run keeps what it measured
                "reap_seconds": round(reap_seconds, 1),
                "chosen_by": "not measured: --score-once (no candidate table)"
                if args.score_once
                else meta["plan"]["chosen_by"],
                "checkpoints_written": len(written),
                "rows": rows,
                "random_median": _random_median(rows),
            }
            Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    results["seconds"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(results)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)
    return 0


def oracle_plan(args, meta: dict, samples: list, reap_settings: ReapSettings) -> dict:
    """The swap search from the metadata's greedy plan run on the evaluation samples themselves (their answers as
    the targets, the reap stage's objective), with --oracle-budget evaluations: the plan entry to write."""
    from reap_vlm.moe import find_moe_blocks
    from reap_vlm.reap import encode

    table = meta.get("candidates") or {}
    greedy = next((r for r in table.get("rows", []) if r["policy"] == "greedy"), None)
    if greedy is None:
        raise RuntimeError("--oracle-budget needs the greedy plan in the candidate table (REAP_GREEDY_SEARCH)")
    model, processor, _ = load_model(args.model_path, device="cpu", dtype="float32")
    rows = samples if args.oracle_rows == "all" else [s for s in samples if s.kind == args.oracle_rows]
    ordered = sorted(rows, key=lambda s: (s.kind, s.source, s.task or ""))  # no image row padded to a text's
    batches = encode(
        "encoding the oracle's rows",
        ordered,
        processor,
        answers=True,
        max_seq_len=reap_settings.max_seq_len,
        batch_size=reap_settings.batch_size,
        min_pixels=reap_settings.min_pixels,
        max_pixels=reap_settings.max_pixels,
        chat_template=reap_settings.chat_template,
    )
    kept, info = candidates.swap_plan(
        model,
        find_moe_blocks(model),
        meta,
        batches,
        start=table["plans"][greedy["plan_id"]],
        start_label=f"greedy from {greedy['search']['base']}",
        budget=args.oracle_budget,
        measure=reap_settings.objective,
    )
    print(f"  oracle search: {info['evaluations']} evaluations in {info['seconds']:.0f} s", flush=True)
    which = "the evaluation rows" if args.oracle_rows == "all" else f"the {args.oracle_rows} evaluation rows only"
    return {"label": f"oracle (swap search on {which})", "kind": "oracle", "kept": kept, "search": info}


def _reap(args, out_dir: Path, ratio: float, extra: list[str]) -> tuple[dict, Path, float]:
    """The reap stage with the given settings at this ratio: (metadata, its path, seconds)."""
    settings = load(
        ReapSettings,
        [
            "--model-path",
            args.model_path,
            "--output-path",
            str(out_dir),
            "--prune-ratio",
            str(ratio),
            "--no-plots",
            *extra,  # --eval-ratios R: the table at other ratios does not change the choice; it costs time
            *COMMON,
            *args.reap_args,
        ],
        {},
    )
    t0 = time.perf_counter()
    meta, _ = _quiet(score, settings)
    return meta, settings.metadata_file, time.perf_counter() - t0


def _row(m: dict, original: dict) -> dict:
    ratios = {d: m["log_ppl"][d] - original["log_ppl"][d] for d in original["log_ppl"] if d in m["log_ppl"]}
    out = {"log_ppl_ratio": ratios, "text_mean": statistics.fmean(ratios.values()) if ratios else None}
    for key in ("tf_accuracy", "accuracy"):
        if key in m:
            drops = {t: 100 * (original[key][t] - m[key][t]) for t in original[key] if t in m[key]}
            out[key] = m[key]
            out[key.replace("accuracy", "drop_points")] = drops
            out[key.replace("accuracy", "worst_drop")] = max(drops.values()) if drops else None
    return out


def _line(m: dict, original: dict) -> str:
    r = _row(m, original)
    acc = " ".join(f"{t} {100 * a:.0f}" for t, a in sorted(m["tf_accuracy"].items()))
    gen = " ".join(f"{t} {100 * a:.0f}" for t, a in sorted(m.get("accuracy", {}).items()))
    return f"text {r['text_mean']:+.3f}; teacher-forced {acc}" + (f"; generated {gen}" if gen else "")


def _random_median(rows: list[dict]) -> dict:
    randoms = [r for r in rows if r["kind"] == "random"]
    if not randoms:
        return {}
    out = {"text_mean": statistics.median(r["text_mean"] for r in randoms)}
    for key in ("tf_accuracy", "accuracy"):
        if all(key in r for r in randoms):
            out[key] = {t: statistics.median(r[key][t] for r in randoms) for t in randoms[0][key]}
    return out


def markdown(results: dict) -> str:
    """Per ratio one table: text Δ log-ppl per domain and mean, teacher-forced exact match per task, the
    worst drop; generated exact match where it was measured (auto, random, original)."""
    orig = results["original"]
    tasks = sorted(orig["tf_accuracy"])
    domains = sorted(orig["log_ppl"])
    head = [
        "| plan | text Δ log-ppl, mean | "
        + " | ".join(domains)
        + " | "
        + " | ".join(tasks)
        + " | worst drop (points) | generated exact match (worst drop) |",
        "|---" * (4 + len(domains) + len(tasks)) + "|",
    ]

    def pct(values: dict, t: str) -> str:
        return f"{100 * values[t]:.0f}" if t in values else ""

    ppl = ", ".join(f"{d} {orig['log_ppl'][d]:.3f}" for d in domains)
    acc = ", ".join(f"{t} {pct(orig['tf_accuracy'], t)} / {pct(orig['accuracy'], t)}" for t in tasks)
    out = [
        f"Original: text log-ppl {ppl}; image exact match % (teacher-forced / generated) {acc}.",
        "",
    ]
    out += summary(results)
    for ratio, entry in results["ratios"].items():
        out += [f"### {float(ratio):.0%} of the experts removed", "", f"auto: {entry['chosen_by']}", ""]
        out += head
        for r in entry["rows"]:
            generated = ""
            if "accuracy" in r:
                generated = " ".join(f"{t} {pct(r['accuracy'], t)}" for t in tasks) + f" ({r['worst_drop']:.0f})"
            cells = [
                r["label"],
                f"{r['text_mean']:+.3f}",
                *(f"{r['log_ppl_ratio'][d]:+.3f}" for d in domains),
                *(pct(r["tf_accuracy"], t) for t in tasks),
                f"{r['tf_worst_drop']:.0f}",
                generated,
            ]
            out.append("| " + " | ".join(cells) + " |")
        med = entry["random_median"]
        if med:
            cells = ["median random", f"{med['text_mean']:+.3f}", *("" for _ in domains)]
            cells += [pct(med["tf_accuracy"], t) for t in tasks] + [""]
            cells += [" ".join(f"{t} {pct(med['accuracy'], t)}" for t in tasks) if "accuracy" in med else ""]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out) + "\n"


def summary(results: dict) -> list[str]:
    """One line per plan over every ratio measured: the text mean Δ log-ppl and the worst image task's drop
    (teacher-forced exact match, points; the task named) per ratio."""
    ratios = list(results["ratios"])
    labels: list[str] = []
    for entry in results["ratios"].values():
        labels += [r["label"] for r in entry["rows"] if r["label"] not in labels]
    out = [
        "| plan | "
        + " | ".join(f"{float(r):.0%}: text Δ log-ppl | {float(r):.0%}: worst task drop" for r in ratios)
        + " |",
        "|---" * (1 + 2 * len(ratios)) + "|",
    ]
    for label in labels:
        cells = [label]
        for ratio in ratios:
            row = next((r for r in results["ratios"][ratio]["rows"] if r["label"] == label), None)
            if row is None:
                cells += ["not measured", ""]
                continue
            task = max(row["tf_drop_points"], key=row["tf_drop_points"].get)
            cells += [f"{row['text_mean']:+.3f}", f"{row['tf_worst_drop']:.0f} ({task})"]
        out.append("| " + " | ".join(cells) + " |")
    return [*out, ""]


if __name__ == "__main__":
    sys.exit(main())
