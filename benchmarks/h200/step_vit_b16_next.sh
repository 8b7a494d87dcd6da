#!/bin/bash
# One device call on one H200 (about 5.5 minutes of command time): our ViT-B/16 train step at
# batch 256, fast+qkv+even (run 6's fastest, 94.4 ms) beside the candidates from run 6's
# attribution (benchmarks/profile_attribution.py): +ln (layer norms with a hand-written
# backward), +gelu (GELU whose backward recomputes tanh), +lean (both), +lean+split (both + the
# fused q/k/v product's backward per q, k, v); MM-TS on +lean+split; profiles of
# fast+qkv+even and +lean+split and the optimised HLO of +lean+split (attributed on the device
# after the run); OpenCLIP ViT-B-16 compiled at 256 (warm-up on cores 10-15 while ours
# compiles, then timed alone) and the matmul rate. Run from the repository root, carrying
# wheels/final (see step_vit_b16.sh):
#
#   bash benchmarks/h200/step_vit_b16_next.sh
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_b16.json,
# hlo_fast_qkv_even_lean_split.txt.gz, attribution_lean_split.json(+.txt), openclip_b256.json,
# matmul_after.json.
MAIN=fast+qkv+even+lean+split
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
# Six executables compile side by side (run 6: three in 55 s); the cut is at 300 - 60 s.
taskset -c 0-9 timeout 310 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants fast+qkv+even,fast+qkv+even+ln,fast+qkv+even+gelu,fast+qkv+even+lean,$MAIN \
    --mmts $MAIN --profile $MAIN,fast+qkv+even --hlo $MAIN --steps 10 --rounds 5 \
    --deadline-s 300 --timing-s 60 --ready-file /tmp/ready --go-file /tmp/go \
    2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
timeout 40 python3 benchmarks/profile_attribution.py "$OUT" --variant $MAIN \
    --out "$OUT/attribution_lean_split.json" > "$OUT/attribution_lean_split.txt" 2>&1
el "attribution rc=$?"
