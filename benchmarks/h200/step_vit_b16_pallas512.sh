#!/bin/bash
# One device call on one H200 (about 5 minutes): our ViT-B/16 train step at batch 512,
# fast+qkv+even+lean+flat beside +pln+pgelu (the Pallas layer norms and bias+GELU), MM-TS on
# the latter, beside OpenCLIP ViT-B-16 compiled at 512 (warm-up on cores 10-15 while ours
# compiles, then timed alone) and the matmul rate. Run from the repository root, carrying
# wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_pallas512.sh
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_b16.json, openclip_b512.json,
# matmul_after.json.
F=fast+qkv+even+lean+flat
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 512
taskset -c 0-9 timeout 470 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 512 \
    --variants $F,$F+pln+pgelu --mmts $F+pln+pgelu --steps 10 --rounds 5 \
    --deadline-s 455 --timing-s 90 --ready-file /tmp/ready --go-file /tmp/go \
    2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 512
