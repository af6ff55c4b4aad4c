"""Where the tool may write, and how: one guard for every output of every stage and of the demo.

The rules (each broken rule is one OutputError line, before any work):
- a folder the tool writes (pruned checkpoint, report, demo folder) is new, empty, or carries the tool's own
  marker file `.reap-vlm-output` (written last into every finished output folder); a folder without it is
  never replaced or deleted, not even with --overwrite;
- no target overlaps a model folder (inside it, equal to it, or above it), none holds the metadata the run
  reads, and none is the home folder, `/`, or a folder above them;
- one run per target at a time: a lock file beside the target (`.<name>.reap-lock`, flock: the kernel drops it
  when the process dies, so a lock is never stale);
- an output appears complete or not at all: it is written to `.<name>.reap-tmp-<pid>` beside the target and
  renamed into place; replacing an earlier output moves it aside to `.<name>.reap-old-<pid>` first. The next
  run on the same target resolves whatever a killed run left: it finishes an interrupted swap (the finished new
  output goes into place), restores a moved-aside output when no finished one exists, and removes the rest.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from . import console
from .errors import OutputError

MARKER = ".reap-vlm-output"
TMP_TAG = ".reap-tmp-"
OLD_TAG = ".reap-old-"
LOCK_TAG = ".reap-lock"


def _resolve(path: Path) -> Path:
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError) as err:  # a symlink loop on the way
        raise OutputError(f"the output path {path} cannot be resolved", str(err), "Choose another path") from None


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _forbidden_roots() -> list[tuple[str, Path]]:
    roots = [("the root folder", Path("/"))]
    home = os.path.expanduser("~")
    if home and home != "~":
        roots.append(("the home folder", _resolve(Path(home))))
    return roots


def source_root(model: Path) -> tuple[Path, str]:
    """The folder an output must stay out of for this model, and what to call it: the model folder itself, or
    for a snapshot of the Hugging Face cache (…/hub/models--org--name/snapshots/<commit>, which links its files
    into the repo's blobs/) the whole cache folder."""
    m = _resolve(model)
    if m.parent.name == "snapshots" and m.parent.parent.name.startswith("models--"):
        return m.parent.parent.parent, "the Hugging Face cache that holds that model"
    return m, "that model folder"


def _check_places(target: Path, shown: Path, what: str, setting: str, models: Iterable[Path], files: Iterable[Path]):
    for model in models:
        if model is None:
            continue
        m, label = source_root(model)
        if _overlaps(target, m):
            where = "is" if target == m else ("is inside" if target.is_relative_to(m) else "contains")
            raise OutputError(
                f"the {what} {shown} overlaps the input {model}",
                f"it {where} {label}, and reap-vlm never writes into, over or around a checkpoint",
                f"Set {setting} to a folder outside the model",
            )
    for file in files:
        if file is None:
            continue
        f = _resolve(file)
        if f.is_relative_to(target):
            raise OutputError(
                f"the {what} {shown} holds {file}, which this run reads",
                "writing the output there would replace it",
                f"Set {setting} to a folder that does not contain it",
            )
    for label, root in _forbidden_roots():
        if root.is_relative_to(target):
            raise OutputError(
                f"the {what} {shown} is {label}" + ("" if root == target else f" or above it ({root})"),
                "an output needs a folder of its own",
                f"Set {setting} to a new folder such as ./outputs",
            )


def is_own(folder: Path) -> bool:
    """True when `folder` carries a marker this tool wrote (a small JSON file naming reap-vlm)."""
    marker = Path(folder) / MARKER
    try:
        if marker.is_symlink() or not marker.is_file() or marker.stat().st_size > 4096:
            return False
        return json.loads(marker.read_text()).get("tool") == "reap-vlm"
    except (OSError, ValueError, AttributeError):
        return False


def write_marker(folder: Path, what: str) -> None:
    """The marker names the tool, its version and the kind of output; no time or pid, so reruns are identical."""
    from .provenance import tool_version

    payload = {
        "tool": "reap-vlm",
        "version": tool_version(),
        "what": what,
        "note": "Written by reap-vlm: a later run may replace this folder (prune: with --overwrite).",
    }
    (Path(folder) / MARKER).write_text(json.dumps(payload, indent=1) + "\n")


def guard_dir(
    target: Path,
    *,
    what: str,
    setting: str,
    models: Iterable[Path | None] = (),
    files: Iterable[Path | None] = (),
    replace: bool = False,
    flag: str = "--overwrite",
) -> Path:
    """Refuse an output folder the tool may not write; returns the resolved target.

    `replace`: an earlier output of this tool (with the marker) may be replaced; without it, such a folder is
    refused with a hint to pass `flag`."""
    shown = Path(target)
    t = _resolve(shown)
    _check_places(t, shown, what, setting, models, files)
    if t.exists() or t.is_symlink():
        if not t.is_dir():
            raise OutputError(
                f"the {what} {shown} exists and is not a folder", "", f"Remove it or set {setting} to a folder"
            )
        if any(t.iterdir()):
            if not is_own(t):
                raise OutputError(
                    f"the {what} {shown} already exists and is not empty",
                    f"it has no {MARKER} marker, so reap-vlm did not write it and never replaces it "
                    "(not even with --overwrite)",
                    f"Choose another folder for {setting}, or empty it yourself",
                )
            if not replace:
                raise OutputError(
                    f"the {what} {shown} already exists and is not empty",
                    "it is an earlier reap-vlm output",
                    f"Choose another folder or pass {flag} to replace it",
                )
    return t


def guard_file(target: Path, *, what: str, setting: str, models: Iterable[Path | None] = ()) -> Path:
    """Refuse an output file (and the folder it shares with its sibling outputs) the tool may not write."""
    shown = Path(target)
    t = _resolve(shown)
    for model in models:
        if model is not None and t.parent.is_relative_to(source_root(model)[0]):
            raise OutputError(
                f"the {what} {shown} is inside the model folder {model}"
                + ("" if source_root(model)[0] == _resolve(model) else " (the Hugging Face cache that holds it)"),
                "reap-vlm never writes into a model checkpoint",
                f"Set {setting} to a folder outside the model",
            )
    for label, root in _forbidden_roots():
        if root.is_relative_to(t.parent):
            raise OutputError(
                f"the {what} {shown} would be written into {label}",
                "a stage writes several files next to it (settings, plots), so it needs a folder of its own",
                f"Set {setting} to a new folder such as ./outputs",
            )
    if t.is_dir() or (t.exists() and not t.is_file()):
        raise OutputError(f"the {what} {shown} exists and is not a regular file", "", f"Remove it or change {setting}")
    return t


# ---- locking ----------------------------------------------------------------------------------------------


def lock_path(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}{LOCK_TAG}"


@contextmanager
def locked(target: Path) -> Iterator[None]:
    """Hold the target's lock for the block; a second run on the same target fails at once with one line."""
    path = lock_path(target)
    created = []  # folders made for the lock, removed again at the end when the run left them empty
    for folder in [path.parent, *path.parent.parents]:
        if folder.exists():
            break
        created.append(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise OutputError(
                f"another reap-vlm run (pid {holder}) is writing {target}",
                f"it holds {path}",
                "Wait for it to finish, or choose another output path",
            ) from None
        try:  # the file may have been removed by the holder we waited for: lock the file that is there now
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(path)
        finally:
            os.close(fd)
        for folder in created:
            try:
                folder.rmdir()
            except OSError:
                break


# ---- atomic folders -----------------------------------------------------------------------------------------


def temp_dir(target: Path) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}{TMP_TAG}{os.getpid()}"


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails instead of replacing a `dst` that appeared meanwhile (renameat2 RENAME_NOREPLACE)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is not None:
        at_fdcwd, noreplace = -100, 1
        if fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), noreplace) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), str(dst))
    if dst.exists() or dst.is_symlink():  # a file system without RENAME_NOREPLACE
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(dst))
    os.rename(src, dst)


def put_in_place(tmp: Path, target: Path, what: str, *, replace: bool) -> None:
    """Rename the finished folder `tmp` (marker written) to `target`; an earlier own output is moved aside
    first and removed after. A target that appeared since the guard ran is never replaced."""
    target = Path(target)
    if target.exists() or target.is_symlink():
        if not (replace and is_own(target)):
            raise OutputError(
                f"the {what} {target} appeared while this run was writing",
                "another program created it; it is left as it is",
                "Choose another folder and run again",
            )
        old = target.parent / f".{target.name}{OLD_TAG}{os.getpid()}"
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
        return
    try:
        _rename_noreplace(tmp, target)
    except OSError as err:
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputError(
                f"the {what} {target} appeared while this run was writing",
                "another program created it; it is left as it is",
                "Choose another folder and run again",
            ) from None
        raise


def resolve_leftovers(target: Path, say=console.info) -> None:
    """Resolve what a killed run left beside `target` (call with the target's lock held, before writing).

    A finished temporary folder (it carries the marker, written last) is put in place when the target is
    missing because a replacement was interrupted between its two renames; else a moved-aside earlier output
    is restored; everything else the tool left (unfinished folders, superseded outputs) is removed."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return
    olds = sorted(parent.glob(f".{target.name}{OLD_TAG}*"), key=lambda p: p.stat().st_mtime, reverse=True)
    tmps = sorted(parent.glob(f".{target.name}{TMP_TAG}*"), key=lambda p: p.stat().st_mtime, reverse=True)
    finished = [t for t in tmps if t.is_dir() and not t.is_symlink() and is_own(t)]
    if not target.exists() and not target.is_symlink() and olds:
        if finished:
            os.rename(finished[0], target)
            say(f"finished an interrupted replacement: the verified new output {finished[0].name} is now {target}")
        else:
            os.rename(olds[0], target)
            say(f"restored the earlier output {target} from {olds[0].name} (a replacement was interrupted)")
    for leftover in [*olds, *tmps]:
        if not (leftover.exists() or leftover.is_symlink()):
            continue
        kind = "replaced output" if OLD_TAG in leftover.name else "unfinished output"
        say(f"removing the {kind} of an interrupted earlier run: {leftover}")
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)


# ---- a set of files written together ------------------------------------------------------------------------


class StagedFiles:
    """Files that appear together or not at all: `path(name)` is a temporary name beside the final one;
    `commit()` renames them all into place (the first one named last), `discard()` removes them."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.names: list[str] = []

    def path(self, name: str) -> Path:
        self.names.append(name)
        return self._tmp(name)

    def _tmp(self, name: str) -> Path:
        stem, dot, suffix = name.rpartition(".")
        base = f"{stem}{TMP_TAG}{os.getpid()}{dot}{suffix}" if dot and stem else f"{name}{TMP_TAG}{os.getpid()}"
        return self.folder / f".{base}"

    def commit(self) -> None:
        for name in [*self.names[1:], *self.names[:1]]:  # the main file (metadata) last
            if self._tmp(name).exists():
                os.replace(self._tmp(name), self.folder / name)

    def discard(self) -> None:
        for name in self.names:
            self._tmp(name).unlink(missing_ok=True)

    def leftovers(self, names: Iterable[str], say=console.info) -> None:
        """Remove staged files of these names that a killed run left (call with the lock held)."""
        for name in names:
            stem, dot, suffix = name.rpartition(".")
            pattern = f".{stem}{TMP_TAG}*{dot}{suffix}" if dot and stem else f".{name}{TMP_TAG}*"
            for old in self.folder.glob(pattern):
                say(f"removing the unfinished output of an interrupted earlier run: {old}")
                old.unlink(missing_ok=True)


@contextmanager
def staged(folder: Path) -> Iterator[StagedFiles]:
    files = StagedFiles(folder)
    try:
        yield files
    except BaseException:
        files.discard()
        raise
    try:
        files.commit()
    except BaseException:
        files.discard()
        raise
