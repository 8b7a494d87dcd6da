#!/bin/bash
# One device call on one H200 (about 8.5 minutes of command time): our ViT-B/16 train step at
# batch 256 for runs 8-9's fastest, fast+qkv+even+lean+flat, beside the same with the Pallas
# layer norms (+pln), the Pallas bias+GELU (+pgelu) and both; MM-TS on both; a profile and the
# optimised HLO of both (attributed on the device afterwards); OpenCLIP ViT-B-16 compiled at
# 256 (warm-up on cores 10-15 while ours compiles, then timed alone) and the matmul rate. Run
# from the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_pallas.sh
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_b16.json, openclip_b256.json,
# matmul_after.json, attribution_pallas.json, hlo_*_pln_pgelu.txt.gz.
F=fast+qkv+even+lean+flat
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
taskset -c 0-9 timeout 470 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $F,$F+pln,$F+pgelu,$F+pln+pgelu --mmts $F+pln+pgelu --profile $F+pln+pgelu \
    --hlo $F+pln+pgelu --steps 10 --rounds 5 --deadline-s 455 --timing-s 90 \
    --ready-file /tmp/ready --go-file /tmp/go 2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
attribute $F+pln+pgelu pallas
