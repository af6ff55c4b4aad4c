"""The pruned (or merged) checkpoint's model card, README.md, through huggingface_hub.ModelCard / ModelCardData.

The source card's YAML front matter is kept and extended: `base_model` is the source (its Hub id, when known),
`tags` gain the tool's, `license` / `license_name` / `license_link` and every other key carry over,
`pipeline_tag` and `library_name` are filled when the source has none. `base_model_relation` is `merge` for a
merged checkpoint; a pruned one leaves it unset, because the Hub knows only adapter, merge, quantized and
finetune, and pruning is none of them. The body says what was removed, how to load it (transformers, vLLM),
how it was made, the test stage's headline numbers once that stage has run (`add_results`), and then the
source card's own text.
"""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from . import console
from .errors import CheckpointError
from .validate import read_text

MAX_SOURCE_CARD = 4 << 20
RESULTS_START, RESULTS_END = "<!-- reap-vlm:test-results:start -->", "<!-- reap-vlm:test-results:end -->"
NOT_TESTED = "Not measured yet: the test stage (`reap-vlm test`, `./run.sh test`) adds its numbers here."


def source_card(src: Path) -> ModelCard | None:
    """The source checkpoint's README.md as a ModelCard (None without one); a card whose front matter is not
    valid YAML is kept as text, without metadata."""
    path = Path(src) / "README.md"
    if not path.exists():
        return None
    text = read_text(path, CheckpointError, "Fix or remove the model card README.md", MAX_SOURCE_CARD)
    import yaml

    try:
        return ModelCard(text, ignore_metadata_errors=True)
    except (ValueError, yaml.YAMLError) as err:  # front matter that is not a YAML mapping
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        console.info(
            f"note: the source model card's front matter is not valid YAML ({first}); its metadata is not kept"
        )
        body = text.split("---", 2)[-1] if text.startswith("---") else text
        return ModelCard("---\n---\n" + body)


def _usage(vision: bool) -> list[str]:
    path = "path/to/this/model"  # this folder, or its Hub id once uploaded
    if vision:
        code = [
            "```python",
            "from transformers import AutoModelForImageTextToText, AutoProcessor",
            "",
            f'MODEL = "{path}"  # this folder, or its Hub id once uploaded',
            'IMAGE = "https://example.com/image.jpg"  # a URL or a local file',
            "",
            'model = AutoModelForImageTextToText.from_pretrained(MODEL, dtype="auto", device_map="auto")',
            "processor = AutoProcessor.from_pretrained(MODEL)",
            'messages = [{"role": "user", "content": [{"type": "image", "url": IMAGE}, '
            '{"type": "text", "text": "Describe this image."}]}]',
            "inputs = processor.apply_chat_template(",
            '    messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"',
            ").to(model.device)",
            "out = model.generate(**inputs, max_new_tokens=64)",
            'print(processor.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
            "```",
        ]
    else:
        code = [
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "",
            f'MODEL = "{path}"  # this folder, or its Hub id once uploaded',
            "",
            'model = AutoModelForCausalLM.from_pretrained(MODEL, dtype="auto", device_map="auto")',
            "tokenizer = AutoTokenizer.from_pretrained(MODEL)",
            'messages = [{"role": "user", "content": "Write a haiku about experts."}]',
            "inputs = tokenizer.apply_chat_template(",
            '    messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"',
            ").to(model.device)",
            "out = model.generate(**inputs, max_new_tokens=64)",
            'print(tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))',
            "```",
        ]
    return [
        "## Usage",
        "",
        "transformers (the architecture is the source's; only the expert count per MoE layer changed):",
        "",
        *code,
        "",
        "vLLM (OpenAI-compatible server):",
        "",
        "```bash",
        f"vllm serve {path}",
        "```",
        "",
        "SGLang, llama.cpp and what each needs (uniform expert counts, kernel-friendly sizes, expert "
        "parallelism): see REAP-VLM's docs/serving.md.",
    ]


def build(
    provenance: dict,
    config: dict,
    *,
    num_experts: int,
    n_keep: int,
    moe_layers: int,
    src: Path,
    base_model: str | None,
    name: str | None = None,
) -> str:
    """The whole README.md of the new checkpoint (front matter + body) as text."""
    from .loading import is_vision_language
    from .provenance import tool_version

    merged = provenance.get("method") == "merge"
    source = source_card(src)
    data = source.data.to_dict() if source is not None else {}
    data = {k: v for k, v in data.items() if v is not None}
    vision = is_vision_language(config)
    if base_model:
        data["base_model"] = base_model
    else:
        data.pop("base_model", None)  # the source's own base is not this checkpoint's base
    data.pop("base_model_relation", None)
    if merged and base_model:
        data["base_model_relation"] = "merge"
    own = ["reap-vlm", "moe", "expert-merging" if merged else "expert-pruning", "merged" if merged else "pruned"]
    tags = data.get("tags") or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    data["tags"] = tags + [t for t in own if t not in tags]
    data.setdefault("pipeline_tag", "image-text-to-text" if vision else "text-generation")
    data.setdefault("library_name", "transformers")
    data.pop("model-index", None)  # the source's evaluation results are not this checkpoint's
    data.pop("eval_results", None)
    card_data = ModelCardData(**data)

    arch = provenance["source"]["architecture"]
    shown = base_model or name or arch
    removed = num_experts - n_keep
    verb = "merged" if merged else "pruned"
    lines = [
        f"# {shown.split('/')[-1]}, {verb} to {n_keep} of {num_experts} experts with REAP-VLM",
        "",
    ]
    if merged:
        m = provenance["merge"]
        lines += [
            f"This checkpoint is {f'`{base_model}`' if base_model else 'the source model'} ({arch}) with its "
            f"{num_experts} routed experts merged into {n_keep} in each of {moe_layers} MoE layers: {m['grouping']} "
            f"grouping (group size {m['group_size']}) on the `{provenance['criterion']}` saliency, every member's "
            f"neurons aligned onto its group's centroid, then averaged with the saliencies as weights; router "
            f"rows: {m['router']}.",
        ]
    else:
        lines += [
            f"This checkpoint is {f'`{base_model}`' if base_model else 'the source model'} ({arch}) with {removed} "
            f"of {num_experts} routed experts removed in each of {moe_layers} MoE layers ({n_keep} kept), chosen "
            f"by the `{provenance['criterion']}` criterion on calibration data.",
        ]
    lines += [
        "",
        "Everything outside the MoE expert tensors (attention, embeddings, the vision tower, shared experts) is "
        "byte-identical to the source. "
        + (
            "Each output expert sits where its group's centroid was."
            if merged
            else "The router rows of removed experts are gone, so the model routes exactly as the original "
            "would with those experts' router logits set to -inf."
        ),
        "",
        *_usage(vision),
        "",
        "## Test results",
        "",
        RESULTS_START,
        NOT_TESTED,
        RESULTS_END,
        "",
        "## How it was made",
        "",
        f"- tool: reap-vlm {tool_version()} (`reap` scores the experts, `prune` rewrites the shards, `test` "
        "compares with the original)",
        f"- source: {f'`{base_model}`' if base_model else 'a local checkpoint'}, `{arch}`, "
        f"config sha256 `{provenance['source']['config_sha256'][:16]}…`",
        f"- method: {'merge' if merged else 'prune'}; criterion `{provenance['criterion']}`"
        + (f", modality policy `{provenance['modality']}`" if provenance.get("modality") else "")
        + (f", ratio {provenance['ratio']}" if provenance.get("ratio") is not None else "")
        + f"; {n_keep} experts kept per layer",
        f"- scoring: `{provenance['scoring_mode']}` mode on calibration data `{provenance['calibration']}`",
        "- kept expert indices per layer: `config.json` → `reap_pruning`",
    ]
    if source is not None and source.text.strip():
        lines += ["", "## Source model card", "", source.text.strip()]
    return str(ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines) + "\n"))


def results_section(report: dict) -> str:
    """The test stage's headline numbers, as Markdown, for the card's results section."""
    from .evaluate import before_after

    o = report["metrics"].get("overall", {})
    lines = [
        f"Verdict of `reap-vlm test` against the original: **{'PASS' if report['passed'] else 'FAIL'}** "
        f"on {report['samples']} held-out samples"
        + (f"; failing checks: {'; '.join(report['failures'])}" if report.get("failures") else "")
        + ".",
        "",
    ]
    if o.get("agreement") is not None:
        lines += [
            f"Next-token top-1 agreement with the original {o['agreement']:.3f}, KL(original ‖ pruned) "
            f"{o.get('kl', float('nan')):.4f} nats per token.",
            "",
        ]
    rows = before_after(report)
    if rows:
        lines += ["| measure | original | this model | change |", "|---|---|---|---|"]
        lines += [f"| {what} | {before} | {after} | {change} |" for what, before, after, change in rows]
    return "\n".join(lines)


def add_results(folder: Path, report: dict) -> bool:
    """Put the test stage's numbers into the card of a checkpoint this tool wrote (replacing earlier ones);
    the README.md is replaced atomically. False when the folder's card is not one of this tool's."""
    path = Path(folder) / "README.md"
    if path.is_symlink() or not path.is_file():
        return False
    text = read_text(path, CheckpointError, "Re-run the prune stage", MAX_SOURCE_CARD)
    if RESULTS_START not in text or RESULTS_END not in text:
        return False
    head, rest = text.split(RESULTS_START, 1)
    _, tail = rest.split(RESULTS_END, 1)
    card = ModelCard(f"{head}{RESULTS_START}\n{results_section(report)}\n{RESULTS_END}{tail}")
    tmp = path.with_name(f".README.md.reap-tmp-{os.getpid()}")
    try:
        tmp.write_text(str(card))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return True


def record_results(folder: Path, report: dict) -> None:
    """The test stage's call: the numbers go into the card when the pruned folder is this tool's output (its
    marker) and no other run is writing it; else a note says why not."""
    from . import outputs
    from .errors import OutputError

    if not outputs.is_own(folder):
        console.info(f"note: {folder} is not a reap-vlm output: its model card is left as it is")
        return
    try:
        with outputs.locked(folder):
            added = add_results(folder, report)
    except OutputError as err:
        console.info(f"note: the model card was not updated: {err}")
        return
    if added:
        console.info(f"test results added to the model card {Path(folder) / 'README.md'}")
