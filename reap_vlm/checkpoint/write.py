"""Plan and write a pruned checkpoint by streaming bytes; the model is never loaded.

Every output tensor is described as a list of byte ranges of the source files (untouched tensors:
one range; kept experts of a fused tensor or router rows: one range per kept expert, since the
expert axis is the outermost) or, for the rare slice along an inner axis (a transposed router),
a small gathered array. The writer streams those pieces into new safetensors files in a temporary
folder beside the target, writes config.json and the index last, verifies, writes the tool's marker, then
renames the folder into place (reap_vlm.outputs: the guard, the lock and the crash recovery). Memory stays
at one copy buffer plus the small gathered arrays.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .. import outputs
from ..errors import BugError, CheckpointError, OutputError, PlanError
from ..families import MAX_EXTRA_ROWS
from ..settings import parse_size
from .layout import COUNT_KEYS, DTYPE_BYTES, Layout, read_header

CHUNK = 16 << 20
SKIP_FILES = {"model.safetensors.index.json", "config.json"}
SKIP_DIRS = {".git", ".cache"}  # version control and huggingface_hub's download cache: not the checkpoint


@dataclass(eq=False)
class Computed:
    """Bytes made when the writer reaches them (merged experts): `produce()` returns exactly `nbytes`
    bytes. The writer records their sha256, which verification compares with the written file."""

    nbytes: int
    produce: Callable[[], bytes]
    sha256: str = ""


def _piece_size(p) -> int:
    if isinstance(p, bytes):
        return len(p)
    if isinstance(p, Computed):
        return p.nbytes
    return p[2] - p[1]


@dataclass
class OutTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    # (shard, start, end) byte ranges of the source, raw bytes, or Computed bytes
    pieces: list[tuple[str, int, int] | bytes | Computed]
    shard: str = ""  # the source shard the tensor came from

    @property
    def nbytes(self) -> int:
        return sum(_piece_size(p) for p in self.pieces)


@dataclass
class PrunePlan:
    layout: Layout
    keep: dict[tuple[int, str], list[int]]
    shards: dict[str, list[OutTensor]]  # output shard name -> tensors in order
    config: dict
    notes: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for ts in self.shards.values() for t in ts)


def _slice_rows(info, kept: list[int], num: int) -> list[tuple[str, int, int]]:
    row = info.nbytes // num
    pieces: list[tuple[str, int, int]] = []
    for j in kept:  # merge contiguous runs into one range
        start = info.start + j * row
        if pieces and pieces[-1][2] == start:
            pieces[-1] = (pieces[-1][0], pieces[-1][1], start + row)
        else:
            pieces.append((info.shard, start, start + row))
    return pieces


def _gather(layout: Layout, info, axis: int, kept: list[int]) -> bytes:
    with open(layout.src / info.shard, "rb") as fh:
        fh.seek(info.start)
        raw = fh.read(info.nbytes)
    width = DTYPE_BYTES[info.dtype]
    arr = np.frombuffer(raw, dtype=np.dtype(f"V{width}")).reshape(info.shape)
    return np.ascontiguousarray(np.take(arr, kept, axis=axis)).tobytes()


def _gather_rows(layout: Layout, info, per_row: list[list[int]]) -> bytes:
    """A [sets, E] buffer whose row i is sliced with its own keep list."""
    with open(layout.src / info.shard, "rb") as fh:
        fh.seek(info.start)
        raw = fh.read(info.nbytes)
    arr = np.frombuffer(raw, dtype=np.dtype(f"V{DTYPE_BYTES[info.dtype]}")).reshape(info.shape)
    return np.ascontiguousarray(np.stack([arr[i, kept] for i, kept in enumerate(per_row)])).tobytes()


def _rewrite_config(config: dict, old: int, new: int, collapse: bool) -> dict:
    """Every expert-count key (and alias) that holds the old count, at any nesting level."""
    out = copy.deepcopy(config)

    def visit(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key in COUNT_KEYS and value == old:
                    node[key] = new
                elif collapse and key in ("n_group", "topk_group") and isinstance(value, int):
                    node[key] = 1
                else:
                    visit(value)

    visit(out)
    return out


def plan_prune(
    layout: Layout, keep: dict[tuple[int, str], list[int]], *, collapse_groups: bool = False, max_shard_size: str = ""
) -> PrunePlan:
    """Validate the keep plan against the checkpoint and describe every output tensor. Writes nothing."""
    counts = layout.counts()
    missing = sorted(set(counts) - set(keep))
    extra = sorted(set(keep) - set(counts))
    if missing or extra:
        raise PlanError(
            f"the keep plan does not cover the checkpoint's MoE blocks (missing {missing[:4]}, unknown {extra[:4]})",
            "",
            "Use the metadata written for this model",
        )
    sizes = {len(v) for v in keep.values()}
    if len(sizes) != 1:
        raise PlanError(
            "the plan keeps different numbers of experts in different layers",
            "config.json holds one expert count for all layers",
            "Re-cut with a uniform ratio",
        )
    n_keep = sizes.pop()
    notes = []
    for key, kept in keep.items():
        E = counts[key]
        if len(set(kept)) != len(kept) or any(not 0 <= j < E for j in kept):
            raise PlanError(f"the plan for block {key} has duplicate or out-of-range experts", "", "Re-run reap")
        if n_keep < layout.top_k:
            raise PlanError(
                f"the plan keeps {n_keep} experts, fewer than top_k={layout.top_k}",
                "",
                "Keep at least top_k experts per layer",
            )
        if layout.n_group > 1 and not collapse_groups:
            size = E // layout.n_group
            per_group = [sum(1 for j in kept if j // size == g) for g in range(layout.n_group)]
            if len(set(per_group)) != 1:
                raise PlanError(
                    f"block {key} keeps {per_group} experts in its {layout.n_group} routing groups",
                    "group-limited routing needs the same number in every group, or the groups change",
                    "Re-cut the plan (reap balances groups), or pass --collapse-groups "
                    "(sets n_group = topk_group = 1: routing changes)",
                )
    if layout.n_group > 1 and collapse_groups:
        notes.append(
            "n_group and topk_group set to 1: group-limited routing is off, so routing differs from the original model"
        )
    keep = {k: sorted(v) for k, v in keep.items()}
    out: list[OutTensor] = []
    for name, info in layout.tensors.items():
        role = layout.roles[name]
        if role.kind == "copy":
            out.append(OutTensor(name, info.dtype, info.shape, [(info.shard, info.start, info.end)], info.shard))
            continue
        block = layout.blocks[role.block]
        E = block.num_experts
        if role.kind == "expert":
            key, local = block.locate(role.expert)
            kept = keep[key]
            offset = block.sets.index(key[1]) * n_keep if block.sets else 0
            if local in kept or (not block.sets and local >= E):  # trailing non-prunable experts stay
                new_j = offset + (kept.index(local) if local < E else len(kept) + local - E)
                new_name = role.pattern.format(j=new_j)
                out.append(
                    OutTensor(new_name, info.dtype, info.shape, [(info.shard, info.start, info.end)], info.shard)
                )
            continue
        shape = list(info.shape)
        if role.row_sets:  # row i keeps the experts of set i
            per_row = [keep[(block.layer, s)] for s in block.sets]
            pieces = [_gather_rows(layout, info, per_row)]
            shape[1] = n_keep
            out.append(OutTensor(name, info.dtype, tuple(shape), pieces, info.shard))
            continue
        kept = keep[(block.layer, role.expert_set)] if role.expert_set else keep[block.key]
        rows = kept + list(range(E, shape[role.axis]))  # + trailing non-prunable rows
        if role.axis == 0:
            pieces = _slice_rows(info, rows, shape[0])
        else:
            pieces = [_gather(layout, info, role.axis, rows)]
        shape[role.axis] = len(rows)
        out.append(OutTensor(name, info.dtype, tuple(shape), pieces, info.shard))

    by_name = {t.name: t for t in out}
    if len(by_name) != len(out):
        raise BugError("two output tensors have the same name")
    if max_shard_size:
        limit = parse_size(max_shard_size, "REAP_MAX_SHARD_SIZE")
        groups: list[list[OutTensor]] = [[]]
        for t in out:
            if groups[-1] and sum(x.nbytes for x in groups[-1]) + t.nbytes > limit:
                groups.append([])
            groups[-1].append(t)
        n = len(groups)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        shards = dict(zip(names, groups, strict=True))
    else:
        shards = {s: [] for s in layout.shards}
        for t in out:  # every tensor stays in the shard its source lived in
            shards[t.shard].append(t)
        shards = {s: ts for s, ts in shards.items() if ts}  # a shard of removed experts only disappears
    config = _rewrite_config(layout.config, layout.num_experts, n_keep, collapse_groups)
    return PrunePlan(layout, keep, shards, config, notes)


# ---- writing --------------------------------------------------------------------------------


def _copy_range(src_fh, dst_fh, start: int, end: int) -> None:
    src_fh.seek(start)
    remaining = end - start
    while remaining:
        buf = src_fh.read(min(CHUNK, remaining))
        if not buf:
            raise OutputError(
                "a source shard ended early while copying", "the file changed or is truncated", "Re-copy the checkpoint"
            )
        dst_fh.write(buf)
        remaining -= len(buf)


def _write_shard(path: Path, tensors: list[OutTensor], meta: dict, src: Path, progress) -> None:
    header: dict = {"__metadata__": meta} if meta else {}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors aligns the data to 8 bytes
    handles: dict[str, object] = {}
    try:
        with open(path, "wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for t in tensors:
                for piece in t.pieces:
                    if isinstance(piece, Computed):
                        data = piece.produce()
                        if len(data) != piece.nbytes:
                            raise BugError(f"{t.name}: computed {len(data)} bytes, planned {piece.nbytes}")
                        piece.sha256 = hashlib.sha256(data).hexdigest()
                        piece = data
                    if isinstance(piece, bytes):
                        out.write(piece)
                        continue
                    shard, start, end = piece
                    if shard not in handles:
                        handles[shard] = open(src / shard, "rb")
                    _copy_range(handles[shard], out, start, end)
                if progress:
                    progress(t.name, t.nbytes)
            out.flush()
            os.fsync(out.fileno())
    finally:
        for fh in handles.values():
            fh.close()


def _hash_range(path: Path, start: int, end: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(start)
        remaining = end - start
        while remaining:
            buf = fh.read(min(CHUNK, remaining))
            h.update(buf)
            remaining -= len(buf)
    return h.hexdigest()


def _hashed(t: OutTensor, limit: int, hash_check_all: bool) -> bool:
    return any(isinstance(p, Computed) for p in t.pieces) or hash_check_all or t.nbytes <= limit


def verify(
    plan: PrunePlan,
    dst: Path,
    *,
    hash_check_mb: int = 256,
    hash_check_all: bool = False,
    progress: Callable[[int], Callable[[int], None]] | None = None,
) -> dict:
    """End-of-run invariants; a failure is a bug. Returns what was checked. `progress(total bytes to hash)`
    returns the callback told each hashed tensor's bytes."""
    layout, keep = plan.layout, plan.keep
    seen: dict[str, str] = {}
    hashed = 0
    limit = hash_check_mb << 20
    total = sum(t.nbytes for ts in plan.shards.values() for t in ts if _hashed(t, limit, hash_check_all))
    advance = progress(total) if progress is not None else (lambda _n: None)
    for shard, tensors in plan.shards.items():
        header, data_start = read_header(dst / shard)
        names = [n for n in header if n != "__metadata__"]
        if sorted(names) != sorted(t.name for t in tensors):
            raise BugError(f"{shard} does not hold exactly the planned tensors")
        for t in tensors:
            if t.name in seen:
                raise BugError(f"{t.name} written twice ({seen[t.name]}, {shard})")
            seen[t.name] = shard
            begin, end = header[t.name]["data_offsets"]
            if tuple(header[t.name]["shape"]) != t.shape or end - begin != t.nbytes:
                raise BugError(f"{t.name} was written with the wrong shape or size")
            if any(isinstance(p, Computed) for p in t.pieces):  # every piece against its own hash
                _verify_pieces(layout.src, dst / shard, data_start + begin, t)
                hashed += 1
                advance(t.nbytes)
            elif hash_check_all or t.nbytes <= limit:
                src_hash = hashlib.sha256()
                for piece in t.pieces:
                    if isinstance(piece, bytes):
                        src_hash.update(piece)
                    else:
                        with open(layout.src / piece[0], "rb") as fh:
                            fh.seek(piece[1])
                            src_hash.update(fh.read(piece[2] - piece[1]))
                if _hash_range(dst / shard, data_start + begin, data_start + end) != src_hash.hexdigest():
                    raise BugError(f"{t.name} differs from its source bytes after writing")
                hashed += 1
                advance(t.nbytes)
    # expert axes, router rows and renumbering
    n_keep = len(next(iter(keep.values())))
    per_block: dict[str, int] = {}  # per-expert pattern -> number of expert sets in its block
    for name, role in layout.roles.items():
        if role.kind == "expert":
            per_block[role.pattern] = max(1, len(layout.blocks[role.block].sets))
        elif role.row_sets:
            continue
        elif role.kind in ("fused", "router", "buffer"):
            shape = next(t.shape for ts in plan.shards.values() for t in ts if t.name == name)
            expected = n_keep + layout.tensors[name].shape[role.axis] - layout.blocks[role.block].num_experts
            if shape[role.axis] != expected:
                raise BugError(f"{name} has {shape[role.axis]} rows on its expert axis, expected {expected}")
    for pattern, sets in per_block.items():
        total = layout.num_experts * sets + MAX_EXTRA_ROWS
        source = sorted(j for j in range(total) if pattern.format(j=j) in layout.tensors)
        extra = sum(1 for j in source if j >= layout.num_experts * sets)
        present = sorted(j for j in range(total) if pattern.format(j=j) in seen)
        if present != list(range(n_keep * sets + extra)):
            raise BugError(f"{pattern} was renumbered to {present}, expected 0..{n_keep * sets + extra - 1}")
    return {"tensors": len(seen), "hashed": hashed}


def _verify_pieces(src: Path, path: Path, start: int, t: OutTensor) -> None:
    """A tensor with computed pieces: each piece of the written file against its source range or the
    hash recorded when it was produced."""
    offset = start
    for piece in t.pieces:
        size = _piece_size(piece)
        got = _hash_range(path, offset, offset + size)
        if isinstance(piece, Computed):
            want = piece.sha256
        elif isinstance(piece, bytes):
            want = hashlib.sha256(piece).hexdigest()
        else:
            want = _hash_range(src / piece[0], piece[1], piece[2])
        if got != want:
            raise BugError(f"{t.name} differs from its planned bytes after writing")
        offset += size


def check_target(src: Path, dst: Path, overwrite: bool, metadata: Path | None = None) -> Path:
    """Refuse a target that overlaps the source, holds the metadata the run reads, is the home folder, or is a
    folder the tool did not write; an earlier output of the tool is replaced only with `overwrite`."""
    return outputs.guard_dir(
        dst,
        what="output",
        setting="REAP_PRUNED_MODEL_PATH (--pruned-model-path)",
        models=[src],
        files=[metadata],
        replace=overwrite,
    )


def _confinement(src: Path) -> list[Path]:
    roots = [src]
    # A Hugging Face cache snapshot (models--org--name/snapshots/<revision>) links its files into ../../blobs.
    if src.parent.name == "snapshots" and src.parent.parent.name.startswith("models--"):
        roots.append(src.parent.parent / "blobs")
    return roots


def _refuse(src: Path, rel: Path, what: str) -> CheckpointError:
    return CheckpointError(
        f"{rel} in the model folder {src} {what}",
        "the pruner copies only regular files that lie inside the model folder (a device, FIFO or link loop "
        "would be copied forever)",
        "Replace it with a regular file, or remove it from the model folder",
    )


def non_weight_files(src: Path) -> list[tuple[Path, Path]]:
    """(path relative to the checkpoint, resolved regular file) for every file copied verbatim: tokenizer,
    processor, chat template, custom code. Refuses, before anything is written, a FIFO, device or socket, a
    link that leaves the model folder or loops, and a link to a folder."""
    src = Path(src).resolve()
    roots = _confinement(src)
    found: list[tuple[Path, Path]] = []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        here = Path(dirpath)
        if here == src:  # version-control and download caches are not part of the checkpoint
            dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS]
        for name in sorted(dirnames):
            if (here / name).is_symlink():
                raise _refuse(src, (here / name).relative_to(src), "is a link to a folder")
        for name in sorted(filenames):
            path = here / name
            rel = path.relative_to(src)
            if here == src and (name in SKIP_FILES or name.endswith(".safetensors") or name == outputs.MARKER):
                continue
            try:
                real = path.resolve(strict=True)
            except (OSError, RuntimeError):
                raise _refuse(src, rel, "is a broken link or a link loop") from None
            if not any(real.is_relative_to(root) for root in roots):
                raise _refuse(src, rel, f"links to {real}, outside the model folder")
            if not stat.S_ISREG(os.stat(real).st_mode):
                raise _refuse(src, rel, "is not a regular file (a FIFO, device or socket)")
            found.append((rel, real))
    return found


def _copy_regular(real: Path, dst: Path) -> None:
    """Copy one file, re-checking on the open handle that it is still a regular file (never blocks on a FIFO)."""
    fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputError(f"{real} changed into a special file while copying", "", "Re-copy the checkpoint")
        dst.parent.mkdir(parents=True, exist_ok=True)
        with open(dst, "wb") as out:
            shutil.copyfileobj(fh, out, CHUNK)
    shutil.copystat(real, dst)


def write_pruned(
    plan: PrunePlan,
    dst: Path,
    *,
    overwrite: bool = False,
    metadata: Path | None = None,
    provenance: dict | None = None,
    model_card: str = "",
    hash_check_mb: int = 256,
    hash_check_all: bool = False,
    progress: Callable[[str, int], None] | None = None,
    verify_progress: Callable[[int], Callable[[int], None]] | None = None,
    extra_files: dict[str, str] | None = None,
) -> dict:
    """Write the pruned checkpoint to `dst` atomically (temporary folder beside it, then rename), holding the
    target's lock. `metadata`: the file the run reads, which the target must not hold. `extra_files`: text
    files (name -> content) written into the checkpoint after the source's own files, before the marker."""
    layout = plan.layout
    dst = Path(dst)
    check_target(layout.src, dst, overwrite, metadata)
    extra = non_weight_files(layout.src)
    with outputs.locked(dst):  # makes the parent folder, and removes it again if the run leaves it empty
        outputs.resolve_leftovers(dst)
        check_target(layout.src, dst, overwrite, metadata)  # again: the leftovers may have restored it
        checks = {"hash_check_mb": hash_check_mb, "hash_check_all": hash_check_all, "progress": verify_progress}
        return _write_locked(plan, dst, extra, overwrite, provenance, model_card, checks, progress, extra_files)


def _write_locked(plan, dst, extra, overwrite, provenance, model_card, checks, progress, extra_files=None):
    layout = plan.layout
    needed = plan.total_bytes + sum(real.stat().st_size for _, real in extra)
    free = shutil.disk_usage(dst.parent).free
    if free < needed * 1.02 + (64 << 20):
        raise OutputError(
            f"not enough disk space in {dst.parent}",
            f"{needed / 2**30:.2f} GiB needed, {free / 2**30:.2f} GiB free",
            "Free space or choose another output folder",
        )
    tmp = outputs.temp_dir(dst)
    tmp.mkdir()
    try:
        for rel, real in extra:  # tokenizer, processor, chat template, custom code: verbatim
            _copy_regular(real, tmp / rel)
        for shard, tensors in plan.shards.items():
            _write_shard(tmp / shard, tensors, layout.shard_meta.get(shard, {}), layout.src, progress)
        config = dict(plan.config)
        if provenance is not None:
            config["reap_pruning"] = provenance
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=False) + "\n")
        if model_card:  # it carries the source card's metadata and text (reap_vlm.card)
            (tmp / "README.md").write_text(model_card)
        if len(plan.shards) > 1 or layout.index is not None:
            weight_map = {t.name: shard for shard, ts in plan.shards.items() for t in ts}
            meta = dict((layout.index or {}).get("metadata") or {})
            meta["total_size"] = plan.total_bytes
            if "total_parameters" in meta:
                meta["total_parameters"] = sum(math.prod(t.shape) for ts in plan.shards.values() for t in ts)
            index = {"metadata": meta, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        checked = verify(plan, tmp, **checks)
        outputs.write_marker(tmp, "pruned checkpoint")  # last: a folder with the marker is finished and verified
        outputs.put_in_place(tmp, dst, "output", replace=overwrite)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OutputError):
            raise
        raise OutputError(
            f"writing {dst} failed",
            f"{type(err).__name__}: {err.strerror or err}",
            "Check free space and permissions of the output folder; nothing was left at the target",
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"bytes": plan.total_bytes, "shards": len(plan.shards), **checked}
