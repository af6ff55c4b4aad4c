"""Data-parallel scoring over torch.distributed: every rank scores a disjoint shard of the calibration
batches, the float64 accumulators are combined once at the end, and only rank 0 writes.

Launch with any torch.distributed launcher: `torchrun --nproc-per-node N reap.py ...`,
`accelerate launch --multi_gpu --num_processes N reap.py ...`, or `./run.sh reap --gpus N`
(which runs `python -m reap_vlm.distributed`, torchrun's own launcher with a one-line failure report).

- Shards: batch i belongs to rank i mod N (every rank builds the same batch list from the same samples
  and seed first, so the shards are disjoint, cover every batch and do not depend on timing).
- Model: every rank holds a replica on its own GPU (cuda:LOCAL_RANK) or streams it layer by layer
  (reap_vlm.execution.stream); REAP_EXECUTION=auto decides per rank from that GPU's free memory.
- Statistics: each rank's exported sums are gathered and added in rank order on every rank; the
  max-activation peaks take the maximum; token counts are summed and the "all" entry is rebuilt as
  text + image, exactly as one process builds it. Every rank then holds the same numbers.
- Candidate plans: the held-out (and greedy-search) batches are sharded the same way; every rank runs
  its batches through the unpruned model and every plan, the per-sample rows are gathered and put back
  in batch order, so the candidate table is built from the very rows one process would compute.
- Collectives run on gloo over CPU tensors: what travels is the accumulators (a few MB even for the
  largest models) and the held-out rows, once; the GPUs never wait for each other while scoring.

What is guaranteed against one process on the same batches: counts and token counts exact; max
|activation| exact; every other sum is the float64 sum of the same float32 per-batch partials in
another grouping, so it differs by at most (batches x 2^-53) relative (all terms are >= 0), far below
1e-9; the candidate rows are bit-identical (per-sample sums of one batch's forward), hence the same
table and plan (a plan could only change if two experts' scores tied within that rounding).
"""

from __future__ import annotations

import contextlib
import datetime
import signal
import sys
from collections.abc import Iterator

import torch
import torch.distributed as dist

from . import console
from .errors import EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE, ReapError, SettingsError

TIMEOUT = datetime.timedelta(minutes=60)  # a collective waits this long for a rank that is still working


class RankLostError(ReapError, RuntimeError):
    """Another rank of the data-parallel job stopped (killed, out of memory, an error of its own)."""

    exit_code = EXIT_TERMINATED


# ---- the job ---------------------------------------------------------------------------------------------


def active() -> bool:
    """True inside a data-parallel job of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world() -> int:
    return dist.get_world_size() if active() else 1


def is_writer() -> bool:
    """Only rank 0 writes outputs."""
    return rank() == 0


@contextlib.contextmanager
def joined(settings) -> Iterator:
    """Join the job the launcher started (WORLD_SIZE > 1 in the launcher's environment), or none. Yields
    the settings this rank runs with: REAP_DEVICE auto / cuda becomes this rank's GPU (cuda:LOCAL_RANK).
    The process group is torch's default group; it is left again at the end when it was made here."""
    from .settings import launcher_environment

    env = launcher_environment()
    made = False
    if env["world_size"] > 1 and not dist.is_initialized():
        if not dist.is_available():
            raise SettingsError("a data-parallel launch, but this torch has no torch.distributed", "", "")
        try:
            dist.init_process_group("gloo", timeout=TIMEOUT)
        except (RuntimeError, ValueError) as err:
            raise SettingsError(
                f"rank {env['rank']} of {env['world_size']} could not join the data-parallel job",
                f"{type(err).__name__}: {str(err).splitlines()[0][:160]}",
                "Check the launcher's rendezvous options (--rdzv-endpoint, MASTER_ADDR / MASTER_PORT)",
            ) from None
        made = True
    try:
        if active():
            settings = _rank_settings(settings, env["local_rank"])
            if is_writer():
                console.info(f"data parallel: {world()} ranks, batch i scored by rank i mod {world()}")
        yield settings
    except (KeyboardInterrupt, RankLostError) as err:
        if not active():
            raise
        # Stopped from outside (the launcher's SIGTERM after another rank failed, Ctrl-C) or left alone by a
        # rank that died: the launcher reports the job in one line, so this rank says nothing more. The
        # launcher's stop signal may still arrive while this rank exits: ignored, no traceback from a finalizer.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if isinstance(err, RankLostError):
            code = err.exit_code
        else:
            code = EXIT_TERMINATED if str(err) == "SIGTERM" else EXIT_INTERRUPTED
        raise SystemExit(code) from None
    finally:
        if made:
            with contextlib.suppress(Exception):
                dist.destroy_process_group()


def _rank_settings(settings, local_rank: int):
    import dataclasses

    device = settings.device
    if device in ("auto", "cuda"):
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
        if device != "cpu":
            if local_rank >= torch.cuda.device_count():
                gpus = torch.cuda.device_count()
                raise SettingsError(
                    f"rank {rank()} is local rank {local_rank} on its node, which has {gpus} GPU(s)",
                    "each rank needs a GPU of its own",
                    f"Start at most {gpus} ranks per node (--nproc-per-node, ./run.sh reap --gpus)",
                )
            torch.cuda.set_device(local_rank)  # what allocates on "the" GPU without naming one uses this rank's
    elif device.startswith("cuda:") and world() > 1:
        raise SettingsError(
            f"REAP_DEVICE={device} in a data-parallel job of {world()} ranks",
            "every rank would load its replica onto the same GPU",
            "Use REAP_DEVICE=auto (each rank takes cuda:LOCAL_RANK) or cpu",
        )
    return dataclasses.replace(settings, device=device)


def checkpoint_name(name: str) -> str:
    """Each rank's own accumulator checkpoint: '.reap_accumulators.pt' -> '.reap_accumulators.rank1-of-4.pt'."""
    if not active():
        return name
    stem, dot, suffix = name.rpartition(".")
    return f"{stem}.rank{rank()}-of{world()}{dot}{suffix}" if dot else f"{name}.rank{rank()}-of{world()}"


def shard(items: list, what: str = "") -> list:
    """This rank's items: i mod world == rank (all of them in a single process). With `what`, fewer items
    than ranks is refused (a rank would have nothing to do)."""
    if not active():
        return items
    if what and len(items) < world():
        raise SettingsError(
            f"{len(items)} {what} for {world()} data-parallel ranks",
            "every rank needs at least one",
            "Use fewer ranks, or more samples (REAP_MAX_SAMPLES) or a smaller REAP_BATCH_SIZE",
        )
    # the same list object for the same input: the streamed statistics' pass measures the plans on this rank's
    # held-out shard, and StreamedModel.run_plans recognises that list later (`measured.batches is batches`)
    key = (id(items), rank(), world())
    if key not in _SHARDS or _SHARDS[key][0] is not items:
        _SHARDS[key] = (items, list(items[rank() :: world()]))
    return _SHARDS[key][1]


_SHARDS: dict[tuple, tuple[list, list]] = {}  # (id(list), rank, world) -> (the list, this rank's part)


def on_reduced(fn):
    """`fn(stats)` called with the statistics of all ranks (reduce_stats) instead of this rank's own."""
    return fn if not active() else lambda stats: fn(reduce_stats(stats))


def _collective(fn, *args, **kwargs):
    """A collective; a rank that vanished (its connection closed, or the timeout) is one line."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, dist.DistBackendError) as err:
        if isinstance(err, ReapError):
            raise
        raise RankLostError(
            f"rank {rank()} of {world()}: another rank of the data-parallel job stopped",
            f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:160]}",
            "Nothing was written. Run the same command again with --resume to continue from each rank's "
            "accumulator checkpoint (REAP_CHECKPOINT_EVERY)",
        ) from None


def gather(obj) -> list:
    """Every rank's `obj`, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list = [None] * world()
    _collective(dist.all_gather_object, out, obj)
    return out


def barrier() -> None:
    if active():
        _collective(dist.barrier)


def any_rank(flag: bool) -> bool:
    return any(gather(bool(flag)))


def max_over_ranks(value: float) -> float:
    return max(gather(float(value)))


# ---- the calibration statistics ---------------------------------------------------------------------------


def reduce_stats(stats: dict[str, dict]) -> dict[str, dict]:
    """Combine the ranks' exported statistics (Observer.export): per block and modality, tokens and every sum
    added in rank order (float64), max_abs the maximum; 'all' rebuilt as text + image (BlockStats.export)."""
    if not active():
        return stats
    parts = gather(stats)
    out: dict[str, dict] = {}
    for key in parts[0]:
        block: dict[str, dict] = {}
        for modality in parts[0][key]:
            if modality == "all":
                continue
            block[modality] = _combine([p[key][modality] for p in parts])
        if "all" in parts[0][key]:
            block["all"] = _join_modalities(parts[0][key]["all"], [block[m] for m in block])
        out[key] = block
    return out


def _combine(entries: list[dict]) -> dict:
    out = {}
    for name, value in entries[0].items():
        values = [e[name] for e in entries]
        if value is None:
            out[name] = None
        elif name == "tokens":
            out[name] = sum(int(v) for v in values)
        elif name == "max_abs":
            out[name] = torch.tensor(values, dtype=torch.float64).amax(0).tolist()
        else:
            total = torch.zeros(len(value), dtype=torch.float64)
            for v in values:  # rank order: the same numbers on every rank, whatever the backend
                total += torch.tensor(v, dtype=torch.float64)
            out[name] = total.tolist()
    return out


def _join_modalities(template: dict, modalities: list[dict]) -> dict:
    out = {}
    for name, value in template.items():
        values = [m[name] for m in modalities]
        if value is None:
            out[name] = None
        elif name == "tokens":
            out[name] = sum(values)
        elif name == "max_abs":
            out[name] = torch.tensor(values, dtype=torch.float64).amax(0).tolist()
        else:  # BlockStats.export: acc.sum(0) over (text, image) in float64
            out[name] = torch.tensor(values, dtype=torch.float64).sum(0).tolist()
    return out


def reduce_merge(merge, total_batches: int):
    """The merge statistics of every rank, in place; returns `merge`. In memory (observe.merge_stats.MergeStats):
    the sums added in rank order; the sampled activations put back in batch order (batch i came from rank
    i mod N) and cut to the sample budget, so they come from the same batches as in one process (the rows drawn
    within a batch differ). Streamed (execution.stream.MergedLayers): reduce_merged_tensors."""
    if not active() or merge is None:
        return merge
    if not hasattr(merge, "sums"):
        merge.add(reduce_merged_tensors(merge.tensors(), merge.samples))
        return merge
    # on the CPU: a CUDA tensor would be unpickled onto its GPU in every other rank
    merge.settle()
    sums = {k: {n: t.cpu() for n, t in s.items()} for k, s in merge.sums.items()}
    parts = gather({"sums": sums, "acts": {k: [a.cpu() for a in v] for k, v in merge.acts.items()}})
    for key, sums in merge.sums.items():
        for name, t in sums.items():
            total = torch.zeros_like(t, device="cpu")
            for p in parts:
                total += p["sums"][key][name]
            sums[name] = total.to(t.device)
        merge.acts[key] = _in_batch_order([p["acts"][key] for p in parts], total_batches, merge.samples)
    return merge


def _in_batch_order(per_rank: list[list[torch.Tensor]], total_batches: int, samples: int) -> list[torch.Tensor]:
    n = len(per_rank)
    ordered = [per_rank[i % n][i // n] for i in range(total_batches) if i // n < len(per_rank[i % n])]
    out, taken = [], 0
    for t in ordered:
        if taken >= samples:
            break
        out.append(t[:, : samples - taken])
        taken += out[-1].shape[1]
    return out


def reduce_merged_tensors(tensors: dict[str, torch.Tensor], samples: int) -> dict[str, torch.Tensor]:
    """The streamed path's merge statistics (one tensor dict per rank, streamed.MergedLayers): sums added in
    rank order, the mean gated output re-weighted by each rank's tokens, activations concatenated in rank
    order and cut to the sample budget."""
    if not active():
        return tensors
    parts = gather({k: v.cpu() for k, v in tensors.items()})
    out: dict[str, torch.Tensor] = {}
    for name, t in parts[0].items():
        key, field = name.rsplit(".", 1)
        values = [p[name] for p in parts]
        if field == "activations":
            out[name] = torch.cat(values, dim=1)[:, :samples].contiguous()
        elif field == "mean_gated_output":
            n = [max(int(p[f"{key}.tokens"].item()), 1) for p in parts]
            weighted = sum(v.double() * k for v, k in zip(values, n, strict=True))
            out[name] = (weighted / max(sum(int(p[f"{key}.tokens"].item()) for p in parts), 1)).float()
        else:
            total = torch.zeros_like(t)
            for v in values:
                total += v
            out[name] = total
    return out


# ---- the candidate plans ------------------------------------------------------------------------------


def run_plans(run, model, blocks, batches: list, plans: list, **kwargs):
    """candidates._run_plans over this rank's shard of `batches`, the rows of every rank put back in batch
    order and the usage counts added: the same (baseline rows, rows per plan, counts) as one process."""
    mine = shard(batches)
    if mine:
        baseline, per_plan, counts = run(model, blocks, mine, plans, **kwargs)
    else:  # fewer held-out batches than ranks: this rank adds nothing
        baseline, per_plan = [], [[] for _ in plans]
        zeros = {b.key: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
        counts = [dict(zeros) for _ in range(len(plans) + 1)]
    sizes = [len(b.samples) for b in mine]
    counts = [{key: c.cpu() for key, c in per.items()} for per in counts]
    split = {"baseline": _split(baseline, sizes), "plans": [_split(r, sizes) for r in per_plan], "counts": counts}
    parts = gather(split)
    n = len(parts)
    order = [(i % n, i // n) for i in range(len(batches))]
    baseline_rows = [row for r, j in order for row in parts[r]["baseline"][j]]
    per_plan_rows = [[row for r, j in order for row in parts[r]["plans"][pi][j]] for pi in range(len(plans))]
    total = [{key: sum(p["counts"][i][key] for p in parts) for key in counts[i]} for i in range(len(counts))]
    return baseline_rows, per_plan_rows, total


def _split(rows: list, sizes: list[int]) -> list[list]:
    out, start = [], 0
    for s in sizes:
        out.append(rows[start : start + s])
        start += s
    return out


def hint(settings, execution) -> str | None:
    """One process on a machine with several GPUs: how to use all of them at once."""
    if active() or settings.device != "auto" or not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return None
    n = torch.cuda.device_count()
    how = "one GPU at a time (accelerate's device_map)" if execution.mode == "memory" else "one GPU"
    return (
        f"note: {n} GPUs are visible and one process uses {how}; ./run.sh reap --gpus {n} (or torchrun "
        f"--nproc-per-node {n} reap.py ...) scores on all of them at once (docs/multi-gpu.md)"
    )


# ---- the launcher ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """`python -m reap_vlm.distributed [torchrun options] reap.py [reap options]`: torchrun itself
    (torch.distributed.run, every option of it: --nproc-per-node, --nnodes, --rdzv-endpoint, ...), except
    that a failed rank is reported as one line and its exit code becomes the job's."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # the line below says it
    try:
        run(args)
    except ChildFailedError as err:
        global_rank, first = min(err.failures.items(), key=lambda item: item[1].timestamp)
        code = first.exitcode
        try:
            how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        except ValueError:
            how = f"stopped with code {code}"
        if code == EXIT_USAGE:  # bad input: every rank said what (its line above), resuming would not help
            then = "Fix what the line above says and run again."
        else:
            then = (
                "Run the same command again with --resume to continue from each rank's accumulator checkpoint "
                "(REAP_CHECKPOINT_EVERY)."
            )
        print(
            f"error: data-parallel job failed: rank {global_rank} (local rank {first.local_rank}) {how}; nothing "
            f"was written. {then}",
            file=sys.stderr,
        )
        return 128 - code if code < 0 else code
    except (KeyboardInterrupt, SignalException) as err:  # the agent turns SIGINT / SIGTERM into SignalException
        sig = getattr(err, "sigval", signal.SIGINT)
        print(
            f"error: data-parallel job interrupted ({signal.Signals(sig).name}): nothing was written. Run the same "
            "command again with --resume to continue from each rank's accumulator checkpoint (REAP_CHECKPOINT_EVERY).",
            file=sys.stderr,
        )
        return 128 + int(sig)
    return 0


if __name__ == "__main__":
    sys.exit(main())
