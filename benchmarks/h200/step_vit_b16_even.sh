#!/bin/bash
# One device call on one H200 (run 6, about 3.5 minutes of command time): our ViT-B/16 train
# step at batch 256, fast+qkv (run 5's fastest) vs fast+qkv+even (odd token counts padded once
# per tower), MM-TS on the latter, its profile and optimised HLO, beside OpenCLIP ViT-B-16
# compiled at 256 and the matmul rate. Run from the repository root, carrying wheels/final
# (see step_vit_b16.sh):
#
#   bash benchmarks/h200/step_vit_b16_even.sh
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_b16.json,
# hlo_fast_qkv_even.txt.gz, openclip_b256.json, matmul_after.json.
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
taskset -c 0-9 timeout 300 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants fast+qkv,fast+qkv+even --mmts fast+qkv+even --profile fast+qkv+even \
    --hlo fast+qkv+even --steps 10 --rounds 5 --deadline-s 290 --timing-s 60 \
    --ready-file /tmp/ready --go-file /tmp/go 2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(grep -o '"fast+qkv+even_mmts_overhead_pct": [^,]*' /tmp/jax_stdout.json)"
openclip_after_ours 256
