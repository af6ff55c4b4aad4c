"""Calibration and evaluation data: sources → samples → model inputs through the model's own processor.

Sources (a spec string): a built-in set (general, code, math, writing, vision, tasks, combined), a JSONL
file, an image folder (`folder:PATH` or a directory), a Hugging Face dataset (`hf:NAME[:SPLIT[:FIELD]]`,
needs the optional `datasets` package and a network), or a mix `name:count,name:count`.

Built-in sets ship a calibration and an evaluation file that never overlap. Sources without a
split (JSONL, folders) are split by a content hash: a sample whose SHA-256 ends in 0-50 (1 in 5)
belongs to the evaluation split, every other to calibration — stable, disjoint, and independent
of order and seed.

The evaluation split has two disjoint portions (`heldout_portions`): `selection` (SELECTION_SHARE of
every source's task, or of the source where rows have no task), which the reap stage measures candidate
plans on, and `test`, the rest, which the test stage and the quality benchmark evaluate on — so a plan is
never judged on the data that chose it. Within each (source, task) group the rows are ranked by a hash of
their content and the first SELECTION_SHARE of them are the selection portion: exactly stratified,
deterministic, independent of order and seed. `read_source(name, "selection" | "test")` and
`load_samples(spec, "selection" | "test", ...)` read one portion; `selection_slice` draws the reap stage's
stratified slice (so many questions per task, so many samples per other source) from it.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, StrictFloat, StrictInt, StrictStr, TypeAdapter

from .errors import CalibrationError
from .validate import MAX_PROMPT_BYTES, check, open_regular, parse_json, read_text

log = logging.getLogger(__name__)


def _builtin_dir() -> Path:
    """The built-in sets: the installed package data (calibration/ goes into the wheel as
    reap_vlm/calibration_data, see pyproject.toml), else the calibration/ folder of a source checkout."""
    import importlib.resources

    packaged = importlib.resources.files("reap_vlm") / "calibration_data"
    if packaged.is_dir() and (packaged / "LICENSES").is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parents[1] / "calibration"


CALIBRATION_DIR = _builtin_dir()
TEXT_SETS = ("general", "code", "math", "writing")
IMAGE_SETS = ("tasks", "vision")  # `combined` splits its image share evenly over these
BUILTIN = (*TEXT_SETS, *IMAGE_SETS, "combined")
SPLITS = {"calibration": "calib", "evaluation": "eval"}
PORTIONS = ("selection", "test")  # the evaluation split's two disjoint parts (heldout_portions)
SELECTION_SHARE = 0.4  # of every (source, task) group of the evaluation split: the plan-selection portion
MAX_JSONL_BYTES = 256 * 1024 * 1024
MAX_LINE_BYTES = 4 * 1024 * 1024
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
FOLDER_PROMPT = "Describe this image in detail."
MAX_HF_ROWS = 20000  # rows read from a Hugging Face dataset (its first ones), before the split


@dataclass
class Sample:
    id: str
    source: str
    messages: list[dict]
    answer: str = ""  # a reference answer where the data has one (vision prompts)
    task: str = ""  # the row's task label where the data has one (chart, count, ...)
    key: str = ""  # what identifies the row's content (its JSON line, file name, ...): ranks the held-out portions
    plain: bool = False  # a plain {"text": ...} row (not messages): REAP_CHAT_TEMPLATE=auto keeps it plain text

    @property
    def kind(self) -> str:
        return "image" if self.images else "text"

    @property
    def images(self) -> list[Image.Image]:
        return [
            item["image"]
            for m in self.messages
            if isinstance(m.get("content"), list)
            for item in m["content"]
            if item.get("type") == "image"
        ]

    @property
    def text(self) -> str:
        parts = []
        for m in self.messages:
            content = m.get("content")
            if isinstance(content, str):
                parts.append(content)
            else:
                parts.extend(item.get("text", "") for item in content if item.get("type") == "text")
        return "\n".join(parts)


class SampleList(list):
    """A list of samples that also says what was skipped (undecodable images) per source."""

    def __init__(self, items=(), skipped: dict[str, int] | None = None):
        super().__init__(items)
        self.skipped: dict[str, int] = dict(skipped or {})


@dataclass
class Batch:
    inputs: dict[str, torch.Tensor]
    modality: torch.Tensor  # [B, S]: 0 text, 1 image, -1 padding
    sources: list[str]
    sample_ids: list[str]
    samples: list[Sample] = field(default_factory=list, repr=False)
    # [B, S] bool, only from make_batches(answers=True): True where the token is part of the reference
    # answer written as the assistant turn (its tokens and the end-of-turn token) — the positions whose
    # next-token prediction is the answer. Rows without an answer are all False.
    answer_mask: torch.Tensor | None = None


# ---- sources --------------------------------------------------------------------------------


def _is_eval(key: str) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest(), 16) % 5 == 0


def _user_message(content: list[dict] | str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _open_image(path: Path) -> Image.Image:
    """A decoded RGB image. Not a regular file (a FIFO would block) or a decompression bomb (an image of
    more than Pillow's MAX_IMAGE_PIXELS, which would exhaust memory): a CalibrationError. Undecodable
    bytes: OSError / UnidentifiedImageError, which the callers count as a skipped image."""
    with open_regular(path, CalibrationError, "Use regular image files") as fh:
        try:
            with Image.open(fh) as img:
                return img.convert("RGB")
        except Image.DecompressionBombError as err:
            raise CalibrationError(
                f"image {path} is too large to decode safely",
                str(err).split(" could be")[0].rstrip(","),
                "Downscale it (calibration images are resized to REAP_MAX_PIXELS anyway) or remove it",
            ) from None


def _confined(base: Path, rel: str, source: str) -> Path:
    path = (base / rel).resolve()
    if not path.is_relative_to(base.resolve()):
        raise CalibrationError(
            f"{source}: image path {rel!r} leaves the folder of the JSONL file",
            "image paths must stay inside that folder",
            "Move the image next to the JSONL file and use a relative path",
        )
    return path


class _Item(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    type: StrictStr
    text: StrictStr | None = None
    image: StrictStr | None = None
    path: StrictStr | None = None


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    role: StrictStr = "user"
    content: StrictStr | list[Any]


class _Row(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    text: StrictStr | None = None
    messages: list[_Message] | None = None
    answer: StrictStr | StrictInt | StrictFloat | None = None


ROW_FIX = 'Write one JSON object per line: {"text": "..."} or {"messages": [{"role": "user", "content": [...]}]}'
ITEMS = TypeAdapter(list[_Item])


def _parse_row(row: dict, base: Path, source: str, where: str) -> tuple[list[dict], str]:
    """JSONL row -> (messages with PIL images, reference answer). Raises OSError for bad images."""
    parsed = check(_Row, row, where, CalibrationError, ROW_FIX)
    answer = "" if parsed.answer is None else str(parsed.answer)
    if parsed.text is not None:
        return _user_message([{"type": "text", "text": parsed.text}]), answer
    if not parsed.messages:
        raise CalibrationError(f"{where}: expected a 'text' string or a 'messages' list", "", ROW_FIX)
    out = []
    for i, m in enumerate(parsed.messages):
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        items = []
        for item in check(ITEMS, m.content, where, CalibrationError, ROW_FIX, f"messages.{i}.content."):
            if item.type == "image":
                ref = item.image or item.path
                if ref is None:
                    raise CalibrationError(
                        f"{where}: image item without a path", "", 'Use {"type": "image", "image": "x.png"}'
                    )
                items.append({"type": "image", "image": _open_image(_confined(base, ref, source))})
            elif item.type == "text":
                items.append({"type": "text", "text": item.text or ""})
        out.append({"role": m.role, "content": items})
    return out, answer


def _read_jsonl(path: Path, source: str, split: str | None, id_prefix: str = "") -> SampleList:
    """Rows of a JSONL file; `split` None = all rows (built-in split files), else the hash split.
    Ids are source/prefix+line number, so they are unique across both splits."""
    if not path.exists():
        raise CalibrationError(f"calibration file {path} does not exist", "", "Check REAP_CALIBRATION")
    samples, skipped = [], 0
    too_big = "Split it, or sample it down; calibration needs hundreds of samples, not millions"
    with open_regular(path, CalibrationError, "Point it at a regular JSONL file", MAX_JSONL_BYTES, too_big) as fh:
        for number, raw in enumerate(fh, 1):
            where = f"{path.name} line {number}"
            if len(raw) > MAX_LINE_BYTES:
                raise CalibrationError(f"{where} is longer than {MAX_LINE_BYTES >> 20} MiB", "", "Shorten the sample")
            if not raw.strip():
                continue
            row = parse_json(raw, where, CalibrationError, "Fix or remove that line")
            if not isinstance(row, dict):
                raise CalibrationError(f"{where} is not a JSON object", "", "Write one object per line")
            if split is not None and _is_eval(raw.decode("utf-8", "replace").strip()) != (split == "evaluation"):
                continue
            try:
                messages, answer = _parse_row(row, path.parent, source, where)
            except (OSError, UnidentifiedImageError, ValueError) as err:
                if isinstance(err, CalibrationError):
                    raise
                skipped += 1
                log.warning("%s: image skipped (%s: %s)", where, type(err).__name__, err)
                continue
            task = str(row.get("task", "")) if isinstance(row.get("task"), str) else ""
            key = raw.decode("utf-8", "replace").strip()
            plain = isinstance(row.get("text"), str)
            samples.append(
                Sample(f"{source}/{id_prefix}{number:05d}", source, messages, answer, task, key, plain=plain)
            )
    return SampleList(samples, {source: skipped} if skipped else {})


def _read_folder(folder: Path, split: str) -> SampleList:
    """Every image of a folder with one prompt: the folder's prompt.txt if it has one, else FOLDER_PROMPT."""
    if not folder.is_dir():
        raise CalibrationError(f"image folder {folder} does not exist", "", "Check REAP_CALIBRATION")
    prompt_file = folder / "prompt.txt"
    prompt = FOLDER_PROMPT
    if prompt_file.exists():
        prompt = read_text(prompt_file, CalibrationError, "Write the prompt as UTF-8 text", MAX_PROMPT_BYTES).strip()
    if not prompt:
        raise CalibrationError(f"{prompt_file} is empty", "", "Write the prompt into it, or delete it")
    samples, skipped = [], 0
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        if _is_eval(path.name) != (split == "evaluation"):
            continue
        try:
            image = _open_image(path)
        except (OSError, UnidentifiedImageError) as err:
            skipped += 1
            log.warning("%s: image skipped (%s)", path.name, err)
            continue
        content = [{"type": "image", "image": image}, {"type": "text", "text": prompt}]
        samples.append(Sample(f"{folder.name}/{path.name}", str(folder), _user_message(content), key=path.name))
    return SampleList(samples, {str(folder): skipped} if skipped else {})


def _read_hf(spec: str, split: str) -> SampleList:
    parts = spec.split(":")
    name, hf_split, column = (
        parts[1],
        (parts[2] if len(parts) > 2 else "train"),
        (parts[3] if len(parts) > 3 else "text"),
    )
    try:
        import datasets
    except ImportError:
        raise CalibrationError(
            f"{spec} needs the optional 'datasets' package",
            "it is not installed",
            "pip install datasets (online), or use a built-in set, a JSONL file or an image folder",
        ) from None
    try:
        rows = datasets.load_dataset(name, split=hf_split)
    except Exception as err:  # offline, unknown name, ...: the datasets library raises many kinds
        raise CalibrationError(
            f"could not load the dataset {name}",
            (str(err).splitlines() or [type(err).__name__])[0],
            "Offline? Use a built-in set (" + ", ".join(BUILTIN) + "), a JSONL file or an image folder",
        ) from None
    if len(rows) and column not in rows[0]:
        raise CalibrationError(
            f"{spec}: the dataset has no field {column!r}",
            "fields: " + ", ".join(sorted(rows[0])),
            f"Name the text field: hf:{name}:{hf_split}:FIELD",
        )
    samples = []
    for i in range(min(len(rows), MAX_HF_ROWS)):  # calibration needs hundreds: never decode a whole corpus
        value = rows[i][column]
        if isinstance(value, Image.Image):  # an image column: the image with the folder prompt
            key = hashlib.sha256(value.tobytes()).hexdigest()
            content = [{"type": "image", "image": value.convert("RGB")}, {"type": "text", "text": FOLDER_PROMPT}]
        else:
            key = str(value)
            content = [{"type": "text", "text": key}]
        if _is_eval(key) == (split == "evaluation"):
            samples.append(
                Sample(f"{name}/{i}", spec, _user_message(content), key=key, plain=not isinstance(value, Image.Image))
            )
    return SampleList(samples)


def _portion_rank(sample: Sample) -> str:
    return hashlib.sha256(f"portion:{sample.key or sample.id}".encode()).hexdigest()


def heldout_portions(samples: Iterable[Sample]) -> dict[str, list[Sample]]:
    """An evaluation split cut into its two disjoint portions, {"selection": [...], "test": [...]}, each in the
    input order: per (source, task) group, the round(SELECTION_SHARE · n) rows of lowest content hash are the
    selection portion (where the reap stage chooses its plan), the others the test portion (where the test stage
    and bench/quality.py evaluate it)."""
    samples = list(samples)
    groups: dict[tuple[str, str], list[Sample]] = {}
    for s in samples:
        groups.setdefault((s.source, s.task), []).append(s)
    selected: set[int] = set()
    for group in groups.values():
        ranked = sorted(group, key=_portion_rank)
        selected |= {id(s) for s in ranked[: round(SELECTION_SHARE * len(group))]}
    return {
        "selection": [s for s in samples if id(s) in selected],
        "test": [s for s in samples if id(s) not in selected],
    }


def read_source(name: str, split: str) -> SampleList:
    """Every sample of one source in one split (before counting and shuffling); `selection` and `test` are the
    two portions of the evaluation split (heldout_portions). Split "all": every row of a user's file or folder
    (its held-out samples come from elsewhere), a built-in set's calibration file."""
    if split == "all":
        if name in BUILTIN:
            return read_source(name, "calibration")
        calib, held = read_source(name, "calibration"), read_source(name, "evaluation")
        return SampleList(
            [*calib, *held],
            {k: calib.skipped.get(k, 0) + held.skipped.get(k, 0) for k in {**calib.skipped, **held.skipped}},
        )
    if split in PORTIONS:
        pool = read_source(name, "evaluation")
        return SampleList(heldout_portions(pool)[split], pool.skipped)
    if split not in SPLITS:
        raise CalibrationError(
            f"unknown split {split!r}", "", "Use calibration, evaluation, or one of its portions: selection, test"
        )
    if name in BUILTIN and name != "combined":
        prefix = "eval/" if split == "evaluation" else ""  # the two files both start at line 1
        return _read_jsonl(CALIBRATION_DIR / name / f"{SPLITS[split]}.jsonl", name, None, prefix)
    if name.startswith("hf:"):
        return _read_hf(name, split)
    if name.startswith("folder:"):
        return _read_folder(Path(name[len("folder:") :]), split)
    path = Path(name)
    if path.is_dir():
        return _read_folder(path, split)
    if path.suffix == ".jsonl" or path.exists():
        return _read_jsonl(path, name, split)
    close = difflib.get_close_matches(name, BUILTIN, n=1)
    raise CalibrationError(
        f"unknown calibration source {name!r}",
        f"did you mean {close[0]}?" if close else "not a built-in set, file or folder",
        "Use one of " + ", ".join(BUILTIN) + ", a JSONL file, an image folder, or hf:NAME",
    )


def parse_spec(spec: str) -> list[tuple[str, int | None]]:
    """'code:20,vision:10' -> [("code", 20), ("vision", 10)]. A part without a count gets None."""
    parts = []
    for raw in spec.split(","):
        raw = raw.strip()
        if not raw:
            continue
        head, sep, tail = raw.rpartition(":")
        if sep and tail.isdigit() and head:
            parts.append((head, int(tail)))
        else:
            parts.append((raw, None))
    if not parts:
        raise CalibrationError("the calibration spec is empty", "", "Set REAP_CALIBRATION, e.g. combined")
    for _, count in parts:
        if count is not None and count <= 0:
            raise CalibrationError(
                f"calibration counts must be positive in {spec!r}", "", "Use name:count with count > 0"
            )
    return parts


def _apportion(total: int, weights: list[float]) -> list[int]:
    """Split `total` in proportion to `weights` (largest-remainder rounding: the parts add up exactly)."""
    wsum = sum(weights) or 1.0
    exact = [total * w / wsum for w in weights]
    counts = [int(x) for x in exact]
    for i in sorted(range(len(exact)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _expand(name: str, count: int | None, image_share: float) -> list[tuple[str, int | None, float]]:
    """'combined' -> the image sets sharing image_share evenly, the text sets the rest evenly (relative weights)."""
    if name != "combined":
        return [(name, count, 1.0)]
    weights = [image_share / len(IMAGE_SETS)] * len(IMAGE_SETS) + [(1 - image_share) / len(TEXT_SETS)] * len(TEXT_SETS)
    counts = _apportion(count, weights) if count is not None else [None] * len(weights)
    return list(zip((*IMAGE_SETS, *TEXT_SETS), counts, weights, strict=True))


def _counts(parts: list[tuple[str, int | None]], max_samples: int, image_share: float) -> list[tuple[str, int]]:
    expanded = [e for name, count in parts for e in _expand(name, count, image_share)]
    budget = max(max_samples - sum(c for _, c, _ in expanded if c is not None), 0)
    free = [i for i, (_, c, _) in enumerate(expanded) if c is None]
    shares = _apportion(budget, [expanded[i][2] for i in free])
    counts = [c for _, c, _ in expanded]
    for i, share in zip(free, shares, strict=True):
        counts[i] = share
    merged: dict[str, int] = {}  # a name listed twice draws once, with the summed count
    for (name, _, _), c in zip(expanded, counts, strict=True):
        merged[name] = merged.get(name, 0) + c
    return [(name, c) for name, c in merged.items() if c > 0]


def load_samples(
    spec: str,
    split: str = "calibration",
    *,
    max_samples: int,
    seed: int,
    image_share: float = 0.3,
    shuffle: bool = True,
) -> SampleList:
    """Samples for `spec`, `split`; every part of a mix contributes its share (see module docstring)."""
    samples, skipped = [], {}
    for name, count in _counts(parse_spec(spec), max_samples, image_share):
        pool = read_source(name, split)
        skipped.update(pool.skipped)
        if not pool:
            why = "every image failed to decode" if pool.skipped else f"the {split} split has no samples"
            raise CalibrationError(
                f"calibration source {name!r} is empty", why, "Check the data, or pick another source"
            )
        if count > len(pool):
            log.warning("%s: %d samples asked, its %s split has %d; using all of them", name, count, split, len(pool))
        order = list(pool)
        if shuffle:
            random.Random(f"{seed}:{name}").shuffle(order)
        samples.extend(order[:count])
    if shuffle:
        random.Random(seed).shuffle(samples)
    return SampleList(samples, skipped)


def slice_group(sample: Sample) -> str:
    """What the plan-selection slice stratifies by (and the plan objective weighs equally): a source's task
    where the row has one, else the source."""
    return f"{sample.source}/{sample.task}" if sample.task else sample.source


def selection_slice(
    spec: str, *, per_task: int, per_source: int, max_samples: int, seed: int, split: str = "selection"
) -> SampleList:
    """The reap stage's plan-selection slice: from the selection portion (or `split`) of every source in `spec` (a mix's
    counts are calibration counts and play no part here), up to `per_task` rows of every task with reference
    answers and up to `per_source` rows of every group without (slice_group), drawn at random with `seed`;
    above `max_samples` in all, the groups give one row each in turn (so every group keeps the same count, up
    to one; the first turn goes source by source) until `max_samples`. Ordered by modality, then group
    (so batches do not mix short image questions with long texts); deterministic."""
    names: list[str] = []
    for name, _ in parse_spec(spec):
        names += [n for n, _, _ in _expand(name, None, 0.5) if n not in names]
    groups: dict[str, list[Sample]] = {}
    skipped: dict[str, int] = {}
    for name in names:
        pool = read_source(name, split)
        skipped.update(pool.skipped)
        for s in pool:
            groups.setdefault(slice_group(s), []).append(s)
    # the groups in turn by source (every source's first group, then every source's second, ...), so that a
    # small max_samples still reaches every source
    order: dict[str, int] = {}
    for group in sorted(groups):
        source = groups[group][0].source
        order[group] = sum(1 for g in order if groups[g][0].source == source)
    queues = []
    for group in sorted(groups, key=lambda g: (order[g], groups[g][0].source, g)):
        rows = list(groups[group])
        random.Random(f"{seed}:{group}").shuffle(rows)
        limit = per_task if any(s.answer.strip() for s in rows) else per_source
        queues.append(rows[:limit])
    taken = [0] * len(queues)
    while sum(taken) < max_samples and any(t < len(q) for t, q in zip(taken, queues, strict=True)):
        for i, q in enumerate(queues):
            if taken[i] < len(q) and sum(taken) < max_samples:
                taken[i] += 1
    # text and image samples in separate batches (their lengths differ tenfold: no image row padded to a text's)
    out = sorted((s for t, q in zip(taken, queues, strict=True) for s in q[:t]), key=lambda s: (s.kind, slice_group(s)))
    return SampleList(out, skipped)


# ---- model inputs ---------------------------------------------------------------------------


def _template(processor, messages: list[dict], plain: bool = False) -> tuple[str, bool]:
    """(text, True) through the checkpoint's chat template; (plain text, False) when it has none or when
    `plain` (a plain-text row under REAP_CHAT_TEMPLATE=auto)."""
    has_template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", None), "chat_template", None
    )
    if has_template and not plain:
        return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False), True
    if any(item.get("type") == "image" for m in messages if isinstance(m["content"], list) for item in m["content"]):
        raise CalibrationError(
            "the model's processor has no chat template",
            "image samples need one to place image tokens",
            "Use a checkpoint with chat_template.jinja, or text-only calibration",
        )
    # plain fallback for text models without a template
    text = "\n".join(
        m["content"] if isinstance(m["content"], str) else "".join(i.get("text", "") for i in m["content"])
        for m in messages
    )
    return text, False


def _tokenizer(processor):
    return getattr(processor, "tokenizer", processor)


def image_token_id(processor) -> int | None:
    tok = _tokenizer(processor)
    token = getattr(processor, "image_token", None) or getattr(tok, "image_token", None)
    return tok.convert_tokens_to_ids(token) if token else None


def _size_field(size, key: str):
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _pixel_limits(processor, min_pixels: int | None, max_pixels: int | None) -> tuple[int, int] | None:
    """(min, max) image area for processors that take it (Qwen2-VL style: size = {shortest_edge,
    longest_edge} in pixels), filled from the checkpoint's own limits where a setting is None.
    None for other image processors: they keep the checkpoint's resolution."""
    size = getattr(getattr(processor, "image_processor", None), "size", None)
    lo, hi = _size_field(size, "shortest_edge"), _size_field(size, "longest_edge")
    if size is None or lo is None or hi is None:
        return None
    return (min_pixels if min_pixels is not None else lo), (max_pixels if max_pixels is not None else hi)


def _cut(enc: dict, max_seq_len: int) -> dict:
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in enc:
            enc[key] = enc[key][:, :max_seq_len]
    return enc


def with_answer_turn(sample: Sample) -> list[dict]:
    """The sample's messages followed by its reference answer as the assistant turn."""
    return [*sample.messages, {"role": "assistant", "content": sample.answer.strip()}]


def _end_of_turn(tok, ids: list[int]) -> int | None:
    """Index of the first special token (the chat template's end-of-turn marker) in `ids`."""
    decoder = getattr(tok, "added_tokens_decoder", {}) or {}
    for i, t in enumerate(ids):
        if t == tok.eos_token_id or (t in decoder and getattr(decoder[t], "special", False)):
            return i
    return None


class _NoAnswerSpan(Exception):
    """The reference answer's tokens are not where the template puts them (the sample is skipped)."""


def _answer_span(sample: Sample, processor, text: str, templated: bool, ids: list[int]) -> tuple[int, int]:
    """(start, stop) token positions of the reference answer and its end-of-turn token at the end of `ids`.

    The answer is the last thing the template writes before its end-of-turn marker, so its tokens are
    found from the end of the sequence: the text from the answer on, tokenized alone, must equal the
    sequence's last tokens exactly, and begin with the answer's own tokens; raises _NoAnswerSpan otherwise
    (a tokenizer that merges across the boundary, a template that rewrites the answer)."""
    tok = _tokenizer(processor)
    answer = sample.answer.strip()
    answer_ids = tok(answer, add_special_tokens=False)["input_ids"]
    if templated:
        at = text.rfind(answer)
        tail = tok(text[at:], add_special_tokens=False)["input_ids"] if at >= 0 else []
        eot = _end_of_turn(tok, tail[len(answer_ids) :])
    else:  # plain text + "\n" + answer + EOS (see _encode)
        tail, eot = [*answer_ids, tok.eos_token_id], 0
    if (
        eot is None
        or tail[: len(answer_ids)] != answer_ids
        or len(tail) > len(ids)
        or ids[len(ids) - len(tail) :] != tail
    ):
        raise _NoAnswerSpan(sample.id)
    start = len(ids) - len(tail)
    return start, start + len(answer_ids) + eot + 1


def _encode(
    sample: Sample,
    processor,
    max_seq_len: int,
    min_pixels: int | None,
    max_pixels: int | None,
    answer: bool = False,
    chat_template: str = "always",
) -> dict | None:
    """One sample -> processor outputs (batch of 1), at most max_seq_len tokens, image tokens never cut.

    Too long with an image: text after the last image is dropped; if the image tokens themselves do
    not fit, the image is encoded again at a smaller pixel budget (down to min_pixels); None if even
    that does not fit. With `answer`, the reference answer is the assistant turn, nothing is cut (a
    sample too long for max_seq_len shrinks its image or is None), and the output has "answer_span":
    the (start, stop) token positions of the answer and its end-of-turn token."""
    messages = with_answer_turn(sample) if answer else sample.messages
    text, templated = _template(processor, messages, plain=chat_template == "auto" and sample.plain)
    if answer and not templated:
        text = text + "\n" + sample.answer.strip() + (_tokenizer(processor).eos_token or "")
    images = sample.images
    tok = _tokenizer(processor)

    def finish(enc: dict) -> dict:
        if answer:
            enc["answer_span"] = _answer_span(sample, processor, text, templated, enc["input_ids"][0].tolist())
        return enc

    if not images:
        # the template already holds the special tokens (as tokenizer.apply_chat_template(tokenize=True) does)
        enc = dict(tok(text, return_tensors="pt", add_special_tokens=not templated))
        if answer and enc["input_ids"].shape[1] > max_seq_len:
            return None
        return finish(_cut(enc, max_seq_len))
    text_kwargs = {"add_special_tokens": False} if tok.bos_token and text.startswith(tok.bos_token) else {}
    limits = _pixel_limits(processor, min_pixels, max_pixels)
    image_id = image_token_id(processor)
    for _ in range(6):
        kwargs = dict(text_kwargs)
        if limits is not None:
            kwargs["images_kwargs"] = {"size": {"shortest_edge": limits[0], "longest_edge": limits[1]}}
        enc = dict(processor(text=[text], images=images, return_tensors="pt", **kwargs))
        length = enc["input_ids"].shape[1]
        if length <= max_seq_len:
            return finish(enc)
        if "mm_token_type_ids" in enc:
            is_image = enc["mm_token_type_ids"][0] == 1
        elif image_id is not None:
            is_image = enc["input_ids"][0] == image_id
        else:
            return None  # cannot tell where the image tokens are, so cannot cut safely
        last = int(is_image.nonzero().max()) if is_image.any() else -1
        if last < max_seq_len and not answer:
            return _cut(enc, max_seq_len)
        if limits is None:
            return None
        # image tokens grow with the pixel area: shrink the area to what the room left over allows
        n_image = int(is_image.sum())
        room = max_seq_len - (length - n_image)
        largest = max(img.width * img.height for img in images)
        smaller = int(min(limits[1], largest) * room / n_image * 0.9)
        if room <= 0 or smaller < limits[0]:
            return None
        limits = (limits[0], smaller)
    return None


def _collate(encoded: list[dict], pad_id: int, image_id: int | None) -> tuple[dict, torch.Tensor, torch.Tensor]:
    width = max(e["input_ids"].shape[1] for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    mm = torch.zeros((len(encoded), width), dtype=torch.long)
    answer = torch.zeros((len(encoded), width), dtype=torch.bool)
    for row, e in enumerate(encoded):
        n = e["input_ids"].shape[1]
        ids[row, :n] = e["input_ids"][0]
        mask[row, :n] = e["attention_mask"][0] if "attention_mask" in e else 1
        if "mm_token_type_ids" in e:
            mm[row, :n] = e["mm_token_type_ids"][0]
        elif image_id is not None:
            mm[row, :n] = (e["input_ids"][0] == image_id).long()
        if "answer_span" in e:
            answer[row, e["answer_span"][0] : e["answer_span"][1]] = True
    inputs = {"input_ids": ids, "attention_mask": mask}
    with_images = [e for e in encoded if "pixel_values" in e]
    if with_images:
        inputs["pixel_values"] = torch.cat([e["pixel_values"] for e in with_images])
        inputs["image_grid_thw"] = torch.cat([e["image_grid_thw"] for e in with_images])
        inputs["mm_token_type_ids"] = mm
    elif any("mm_token_type_ids" in e for e in encoded):
        inputs["mm_token_type_ids"] = mm
    modality = torch.where(mask.bool(), (mm == 1).long(), torch.full_like(mm, -1))
    return inputs, modality, answer


def _packed_rows(
    samples: list[Sample], processor, max_seq_len: int, eos_id: int, chat_template: str = "always"
) -> list[tuple[dict, Sample]]:
    """Text samples of one source joined (EOS between them) and cut into rows of max_seq_len tokens."""
    tok = _tokenizer(processor)
    by_source: dict[str, list[Sample]] = {}
    for s in samples:
        by_source.setdefault(s.source, []).append(s)
    rows = []
    for source, group in by_source.items():
        stream: list[int] = []
        for s in group:
            text, templated = _template(processor, s.messages, plain=chat_template == "auto" and s.plain)
            stream.extend(tok(text, add_special_tokens=not templated)["input_ids"] + [eos_id])
        for start in range(0, len(stream), max_seq_len):
            chunk = torch.tensor([stream[start : start + max_seq_len]])
            enc = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
            rows.append((enc, Sample(f"{source}/packed{start // max_seq_len}", source, [])))
    return rows


def _fixed(rows: list, batch_size: int) -> Iterator[list]:
    for start in range(0, len(rows), batch_size):
        yield rows[start : start + batch_size]


def _buckets(rows: list, batch_size: int, max_seq_len: int) -> Iterator[list]:
    """Rows sorted by (has images, length, original order), cut into batches of at most batch_size ×
    max_seq_len positions (rows × the longest row) that never mix text-only rows with image rows."""
    budget = batch_size * max_seq_len
    order = sorted(range(len(rows)), key=lambda i: ("pixel_values" in rows[i][0], rows[i][0]["input_ids"].shape[1], i))
    chunk: list = []
    for i in order:
        enc = rows[i][0]
        width = enc["input_ids"].shape[1]  # the longest so far: rows come sorted by length
        if chunk and (("pixel_values" in enc) != ("pixel_values" in chunk[0][0]) or (len(chunk) + 1) * width > budget):
            yield chunk
            chunk = []
        chunk.append(rows[i])
    if chunk:
        yield chunk


def make_batches(
    samples: Iterable[Sample],
    processor,
    *,
    max_seq_len: int,
    batch_size: int,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    packing: bool = False,
    answers: bool = False,
    bucket: bool = False,
    on_sample: Callable[[int], None] | None = None,
    chat_template: str = "always",
) -> Iterator[Batch]:
    """Encode samples with the model's processor and chat template; right-padded batches.

    `processor` is the checkpoint's processor, or its bare tokenizer for text-only models.
    min_pixels / max_pixels bound each image's area (None: the checkpoint's own limits). Text is cut
    at max_seq_len; an image sample never loses image tokens (see _encode) and is skipped with a
    warning if its image cannot fit. With packing, text samples of one source are joined
    (EOS-separated) into full-length rows; image samples stay one per row.

    With `answers`, every sample that has a reference answer is encoded with it as the assistant turn
    (the chat template's assistant message, ending in its end-of-turn token), never truncated, and
    Batch.answer_mask marks those answer tokens; samples without an answer are encoded as usual. Scoring
    batches leave it off: calibration is scored on the prompts alone.

    With `bucket` (the scoring batches), rows are grouped by kind (text rows, rows with images) and length,
    and a batch takes as many rows as fit in batch_size × max_seq_len positions (buckets): little padding,
    the vision tower only in the batches that have images, and short samples many to a forward. Statistics
    are sums over tokens, so they do not depend on how the rows are batched (up to float rounding).
    `on_sample(n)` is told every n samples encoded (or skipped), for a progress bar.
    `chat_template`: "always" puts every sample through the checkpoint's chat template as a user turn; "auto"
    keeps plain {"text": ...} rows plain text (messages still go through the template)."""
    if max_seq_len < 1 or batch_size < 1:
        raise CalibrationError(
            "max_seq_len and batch_size must be positive", f"got {max_seq_len} and {batch_size}", "Raise them"
        )
    tok = _tokenizer(processor)
    pad_id = next((t for t in (tok.pad_token_id, tok.eos_token_id) if t is not None), 0)
    eos_id = tok.eos_token_id if tok.eos_token_id is not None else pad_id
    image_id = image_token_id(processor)
    samples = list(samples)
    rows: list[tuple[dict, Sample]] = []
    if packing:
        rows = _packed_rows([s for s in samples if s.kind == "text"], processor, max_seq_len, eos_id, chat_template)
        if on_sample is not None:
            on_sample(len(samples) - sum(s.kind == "image" for s in samples))
        samples = [s for s in samples if s.kind == "image"]
    for s in samples:
        with_answer = answers and bool(s.answer.strip())
        try:
            enc = _encode(
                s, processor, max_seq_len, min_pixels, max_pixels, answer=with_answer, chat_template=chat_template
            )
        except _NoAnswerSpan:
            log.warning("%s: the reference answer's tokens are not where the chat template puts them; skipped", s.id)
            continue
        finally:
            if on_sample is not None:
                on_sample(1)  # a skipped sample counts too
        if enc is None:
            log.warning(
                "%s: %s does not fit in %d tokens even at REAP_MIN_PIXELS; skipped "
                "(raise REAP_MAX_SEQ_LEN or lower REAP_MIN_PIXELS)",
                s.id,
                "the sample with its answer" if with_answer else "the image",
                max_seq_len,
            )
            continue
        rows.append((enc, s))
    for chunk in _buckets(rows, batch_size, max_seq_len) if bucket else _fixed(rows, batch_size):
        inputs, modality, answer_mask = _collate([e for e, _ in chunk], pad_id, image_id)
        yield Batch(
            inputs,
            modality,
            [s.source for _, s in chunk],
            [s.id for _, s in chunk],
            [s for _, s in chunk],
            answer_mask if answers else None,
        )


def token_budget(batches: Iterable[Batch]) -> dict:
    """Samples and tokens per source and modality (padding excluded)."""
    sources: dict[str, dict[str, int]] = {}
    for batch in batches:
        for row, source in enumerate(batch.sources):
            entry = sources.setdefault(source, {"samples": 0, "text": 0, "image": 0})
            entry["samples"] += 1
            entry["text"] += int((batch.modality[row] == 0).sum())
            entry["image"] += int((batch.modality[row] == 1).sum())
    total = {k: sum(e[k] for e in sources.values()) for k in ("samples", "text", "image")}
    return {"sources": sources, "total": total}
