"""A sabotaged prune of the trained demo VLM makes the demo's test stage fail with exit 1.

The demo's own stages and flags (reap_vlm.demo.stage_argvs) at the demo's prune ratio: the reap stage scores the
shipped model (full mode, the built-in text + image calibration; the default plan, without the candidate table,
which the sabotage does not need), the prune stage writes the plan, and then the written checkpoint is broken in
one of two ways before the test stage judges it against the original:

- router rows shuffled: every MoE layer's router rows are rotated by one, so each token is sent to the experts
  that were next to the ones it chose (the experts and every other tensor are untouched);
- the image-serving experts removed on purpose: the same number of experts per layer as the demo's plan
  removes, but the ones most specific to image tokens (share of the image tokens' routed picks minus share of
  the text tokens', from the reap stage's per-modality counts), written by the prune stage from a copy of the
  metadata that holds that plan.
"""

from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reap_vlm import demo, evaluate, metadata, prune, reap
from reap_vlm.cli import main as stage_main


@pytest.fixture(scope="module")
def pruned_demo(tmp_path_factory):
    """(folder, the demo's stage flags, metadata) after the demo's reap and prune stages on the trained model."""
    out = tmp_path_factory.mktemp("sabotage")
    model = out / "model"
    shutil.copytree(demo.DEMO_VLM, model)
    argvs = demo.stage_argvs(model, out, trained=True, prune_ratio=demo.TRAINED_RATIO)
    assert stage_main("reap", reap.run, [*argvs["reap"], "--eval-samples", "0", "--no-plots"]) == 0
    assert stage_main("prune", prune.run, argvs["prune"]) == 0
    return out, argvs, metadata.read(out / "reap_metadata.json")


def _test_stage(out, argvs, pruned, name) -> tuple[int, dict]:
    report = out / f"report_{name}"
    code = stage_main(
        "test", evaluate.run, [*argvs["test"], "--pruned-model-path", str(pruned), "--report-path", str(report)]
    )
    return code, json.loads((report / "report.json").read_text())


def _kept(folder) -> dict:
    return json.loads((folder / "config.json").read_text())["reap_pruning"]["kept"]


def test_shuffled_router_rows_fail_the_test_stage(pruned_demo):
    out, argvs, _ = pruned_demo
    broken = out / "router_rotated"
    shutil.copytree(out / "pruned", broken)
    rotated = 0
    for shard in sorted(broken.glob("*.safetensors")):
        with safe_open(shard, "pt") as fh:
            header = fh.metadata()
        tensors = load_file(shard)
        for name, w in tensors.items():
            if name.endswith(".mlp.gate.weight"):  # [experts, hidden]: one row per kept expert
                tensors[name] = torch.roll(w, 1, dims=0)
                assert not torch.equal(tensors[name], w)
                rotated += 1
        save_file(tensors, shard, metadata=header)
    assert rotated == len(_kept(broken)) == 4  # every MoE layer's router
    code, report = _test_stage(out, argvs, broken, "router")
    assert code == 1 and not report["passed"] and report["failures"]
    assert report["metrics"]["overall"]["agreement"] < 0.9


def test_removing_the_image_serving_experts_fails_on_image_tasks(pruned_demo):
    out, argvs, meta = pruned_demo
    removed = {key: 16 - len(kept) for key, kept in _kept(out / "pruned").items()}
    variant = copy.deepcopy(meta)
    for block in meta["model"]["blocks"]:
        stats = meta["layers"][block["key"]]["stats"]
        image, text = (np.asarray(stats[m]["count"], dtype=float) for m in ("image", "text"))
        specific = np.argsort(-(image / image.sum() - text / text.sum()), kind="stable")
        n = removed[block["key"]]  # the metadata's block keys are the config's reap_pruning keys
        variant["layers"][block["key"]].update(kept=sorted(int(j) for j in specific[n:]), protected={})
    assert any(variant["layers"][k]["kept"] != meta["layers"][k]["kept"] for k in meta["layers"])
    variant["plan"].update(chosen_by="test: the most image-specific experts removed")
    path = out / "image_serving_removed.reap_metadata.json"
    metadata.write(path, variant)
    target = out / "image_serving_removed"
    prune_argv = [*argvs["prune"], "--metadata-path", str(path), "--pruned-model-path", str(target)]
    assert stage_main("prune", prune.run, prune_argv) == 0
    code, report = _test_stage(out, argvs, target, "image")
    assert code == 1 and not report["passed"]
    assert any(f.startswith("image task ") for f in report["failures"]), report["failures"]
