"""One reading layer for every file the tool reads: config.json, the safetensors index and headers,
reap_metadata.json, the accumulator checkpoint, calibration JSONL files, image folders and their prompt.txt.

Every reader here refuses, with one ReapError line that names the file and the field:
  - anything but a regular file (a FIFO or a device would block or never end; a symlink loop);
  - a file above its size limit, text that is not UTF-8, JSON that is invalid, holds NaN / Infinity
    or nests deeper than MAX_DEPTH (Python's parser would fail with RecursionError, and so would any
    recursive walk of the result);
  - a value of the wrong type or out of range (pydantic schemas with strict types: `true` is not an
    integer, "2" is not an integer), and the cross-checks no schema can express (a tensor's shape x dtype
    equals its byte length, tensors of a shard never share bytes).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import stat
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, StrictStr, TypeAdapter, ValidationError

from .errors import ReapError

MAX_DEPTH = 64  # deeper than any file this tool reads or writes (metadata: 6 levels)
MAX_CONFIG_BYTES = 16 << 20
MAX_INDEX_BYTES = 256 << 20
MAX_PROMPT_BYTES = 1 << 20
# Bits per element of every safetensors dtype (sub-byte types pack several elements per byte).
DTYPE_BITS = {
    "F64": 64,
    "F32": 32,
    "F16": 16,
    "BF16": 16,
    "I64": 64,
    "I32": 32,
    "I16": 16,
    "I8": 8,
    "U8": 8,
    "BOOL": 8,
    "F8_E4M3": 8,
    "F8_E5M2": 8,
    "U16": 16,
    "U32": 32,
    "U64": 64,
    "F8_E8M0": 8,
    "F4": 4,
}
_KINDS = {
    stat.S_ISDIR: "a directory",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


# ---- files ----------------------------------------------------------------------------------


def _not_regular(path: Path, mode: int, error: type[ReapError], fix: str) -> ReapError:
    kind = next((k for test, k in _KINDS.items() if test(mode)), "not a regular file")
    return error(f"{path} is not a regular file", f"it is {kind}, which could block or never end", fix)


def open_regular(path: Path, error: type[ReapError], fix: str, max_bytes: int | None = None, too_big: str = ""):
    """A binary file object for a regular file of at most `max_bytes`. The check is made on the opened
    descriptor (opened non-blocking, so a FIFO cannot hang the open), so nothing can swap the file in
    between. `fix` is said for a file of the wrong kind, `too_big` (default: `fix`) for one too large."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise error(f"cannot open {path}", err.strerror or str(err), fix) from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(path, info.st_mode, error, fix)
        if max_bytes is not None and info.st_size > max_bytes:
            raise error(
                f"{path} is {info.st_size / 2**20:.1f} MiB",
                f"more than the {max_bytes / 2**20:.0f} MiB such a file can sensibly be",
                too_big or fix,
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_regular(path: Path, error: type[ReapError], fix: str) -> None:
    """Refuse a path that is not a regular file (after following symlinks) without opening it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise error(f"cannot read {path}", err.strerror or str(err), fix) from None
    if not stat.S_ISREG(mode):
        raise _not_regular(Path(path), mode, error, fix)


def read_bytes(path: Path, error: type[ReapError], fix: str, max_bytes: int) -> bytes:
    with open_regular(path, error, fix, max_bytes) as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:  # the file grew after the size check
        raise error(f"{path} is larger than {max_bytes / 2**20:.0f} MiB", "", fix)
    return data


def read_text(path: Path, error: type[ReapError], fix: str, max_bytes: int) -> str:
    return decode(read_bytes(path, error, fix, max_bytes), str(path), error, fix)


def decode(data: bytes, source: str, error: type[ReapError], fix: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{source} is not UTF-8 text", f"byte {err.start} is 0x{data[err.start]:02x}", fix) from None


# ---- JSON -----------------------------------------------------------------------------------


def _reject_constant(name: str):
    raise ValueError(f"non-standard JSON constant {name}")


def depth(obj: Any) -> int:
    """Nesting depth of a parsed JSON value, without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, level)
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json(text: str | bytes, source: str, error: type[ReapError], fix: str) -> Any:
    """Strict JSON: no NaN / Infinity, at most MAX_DEPTH levels deep."""
    if isinstance(text, bytes):
        text = decode(text, source, error, fix)
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise error(f"{source} nests JSON too deeply", f"more than {MAX_DEPTH} levels", fix) from None
    except ValueError as err:  # JSONDecodeError is a ValueError
        raise error(f"{source} is not valid JSON", str(err), fix) from None
    levels = depth(value)
    if levels > MAX_DEPTH:
        raise error(f"{source} nests JSON {levels} levels deep", f"more than {MAX_DEPTH} levels", fix)
    return value


def read_json(path: Path, error: type[ReapError], fix: str, max_bytes: int) -> Any:
    return parse_json(read_bytes(path, error, fix, max_bytes), str(path), error, fix)


# ---- schemas --------------------------------------------------------------------------------


def check(schema, value: Any, source: str, error: type[ReapError], fix: str, at: str = ""):
    """Validate `value` against a pydantic model or TypeAdapter; the first problem becomes the line:
    `<source>: <at><field path> is <value>: it should be ...`."""
    adapter = schema if isinstance(schema, TypeAdapter) else TypeAdapter(schema)
    try:
        return adapter.validate_python(value)
    except ValidationError as err:
        first = err.errors(include_url=False)[0]
        where = at + ".".join(str(p) for p in first["loc"]) or "the top level"
        got = first.get("input")
        shown = repr(got) if not isinstance(got, (dict, list)) else type(got).__name__
        why = re.sub(
            r"Input should be a valid dictionary( or instance of \w+)?", "it should be a JSON object", first["msg"]
        )
        why = why.replace("Input should be", "it should be").replace("Field required", "it is required")
        if first["type"] == "missing":
            shown = "missing"
        raise error(f"{source}: {where} is {shown[:60]}", why, fix) from None


Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class IndexFile(_Strict):
    weight_map: dict[StrictStr, StrictStr]
    metadata: dict[StrictStr, Any] | None = None


class HeaderEntry(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True)
    dtype: Literal[tuple(DTYPE_BITS)]  # type: ignore[valid-type]
    shape: list[Count]
    data_offsets: Annotated[list[Count], Field(min_length=2, max_length=2)]


class Provenance(_Strict):
    """config.json's `reap_pruning` of a pruned checkpoint (written by the prune stage, read by the test stage)."""

    source: dict[StrictStr, Any] = {}
    kept: dict[StrictStr, list[Count]] = {}


HEADER = TypeAdapter(dict[StrictStr, HeaderEntry])
HEADER_METADATA = TypeAdapter(dict[StrictStr, StrictStr] | None)


class _Accumulators(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True)
    batch: Positive
    state: dict[StrictStr, dict[StrictStr, Any]]
    settings_hash: StrictStr


def read_accumulators(path: Path, expected: dict[str, dict], batches: int, error: type[ReapError]) -> dict:
    """The scoring stage's --resume checkpoint: torch.load with weights_only (no code runs), then its
    structure against the observer's own state `expected` (same blocks, tensor names, shapes and dtypes)
    and a batch count below `batches`."""
    import torch

    fix = f"Delete {path} and run again (scoring starts over), or run without --resume"
    with open_regular(path, error, fix) as fh:
        try:
            saved = torch.load(fh, weights_only=True, map_location="cpu")
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError, ... for damaged files
            raise error(
                f"the accumulator checkpoint {path} is unreadable",
                f"it is truncated or not a file reap wrote (torch.load: {type(err).__name__})",
                fix,
            ) from None
    data = check(_Accumulators, saved, f"the accumulator checkpoint {path}", error, fix)
    if not data.batch < batches:
        raise error(f"the accumulator checkpoint {path} is after batch {data.batch}", f"this run has {batches}", fix)
    for key in sorted(set(expected) | set(data.state)):
        theirs, ours = data.state.get(key), expected.get(key)
        ok = theirs is not None and ours is not None and set(theirs) == set(ours)
        ok = ok and all(
            isinstance(theirs[n], torch.Tensor) and theirs[n].shape == t.shape and theirs[n].dtype == t.dtype
            if isinstance(t, torch.Tensor)
            else type(theirs[n]) is type(t)  # growing state (the merge statistics' samples): its kind only
            for n, t in ours.items()
        )
        if not ok:
            raise error(
                f"the accumulator checkpoint {path} does not fit this model",
                f"block {key}: other blocks, statistics or shapes",
                fix,
            )
    return {"batch": data.batch, "state": data.state, "settings_hash": data.settings_hash}
