#!/usr/bin/env bash
# The whole pipeline on a GPU, on generated tiny checkpoints: reap (full, routed, router; bf16),
# prune and test for a Qwen3-VL-MoE; full-mode reap and prune for an Ernie-4.5-VL-MoE and a Llama 4.
# Usage: bash bench/gpu_pipeline.sh OUT_DIR      (each step's log in OUT_DIR, a summary on stdout)
set -uo pipefail
out=${1:?usage: bash bench/gpu_pipeline.sh OUT_DIR}
work=$(mktemp -d)
mkdir -p "$out"
status=0
run() { # name command...
  local name=$1 && shift
  local start=$SECONDS
  "$@" >"$out/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc, $((SECONDS - start)) s"
  ((rc == 0)) || status=1
}
for family in qwen3_vl_moe ernie4_5_vl_moe llama4_text; do
  run "make_$family" python -c "from reap_vlm.tiny import make_tiny; make_tiny('$family', '$work/$family')"
done
m=$work/qwen3_vl_moe
for mode in full routed router; do
  run "reap_$mode" python reap.py --model-path "$m" --output-path "$work/out_$mode" --device cuda \
    --dtype bfloat16 --scoring-mode "$mode" --max-samples 32 --prune-ratio 0.25
done
run prune python prune_model.py --model-path "$m" --metadata-path "$work/out_full/reap_metadata.json" \
  --pruned-model-path "$work/pruned"
run test python test_pruned_model.py --pruned-model-path "$work/pruned" --original-model-path "$m" \
  --metadata-path "$work/out_full/reap_metadata.json" --device cuda --output-path "$out/report"
for family in ernie4_5_vl_moe llama4_text; do
  run "reap_full_$family" python reap.py --model-path "$work/$family" --output-path "$work/out_$family" \
    --device cuda --dtype bfloat16 --scoring-mode full --calibration general --max-samples 16 --prune-ratio 0.25
  run "prune_$family" python prune_model.py --model-path "$work/$family" \
    --metadata-path "$work/out_$family/reap_metadata.json" --pruned-model-path "$work/pruned_$family"
done
rm -rf "$work"
exit "$status"
