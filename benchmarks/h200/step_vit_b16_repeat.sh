#!/bin/bash
# One device call on one H200 (about 5 minutes), issue 17: session 8's fastest ViT-B/16 step
# at batch 256, `fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattnt` (= with_speed(c, "gpu")),
# with and without MM-TS, beside OpenCLIP ViT-B-16 compiled at 256 (warm-up on cores 10-15 while
# ours compiles, then timed alone) and the matmul rate: a repeat of run 23's comparison with
# nothing else in the call, as a third independent sample of the ratio (runs 22, 23 gave 1.198x,
# 1.205x). Run from the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_repeat.sh      # run 28
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_b16.json, openclip_b256.json,
# matmul_after.json.
F=${F:-fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattnt}
D=${DEADLINE:-240}
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
taskset -c 0-9 timeout $((D + 15)) python3 benchmarks/train_step_bench.py --out "$OUT" \
    --batch 256 --variants $F --mmts $F --steps 10 --rounds 5 --deadline-s "$D" --timing-s 40 \
    --ready-file /tmp/ready --go-file /tmp/go 2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians) $(grep -o '"[^"]*_mmts_overhead_pct": [^,]*' /tmp/jax_stdout.json)"
openclip_after_ours 256
