#!/bin/bash
# One device call on one H200 (about 6 minutes), issue 17: our ViT-B/16 train step at batch
# 256, +plnres+pgelu+fopt (run 19's fastest) beside +pqkv (run 21's fastest) and +pqkv+pattnt
# (the Pallas attention kernels in the text tower only: run 21 timed them faster than cuDNN at
# the text tower's shape, slower at the image tower's); MM-TS, a profile and the HLO of
# +pqkv+pattnt; OpenCLIP ViT-B-16 compiled at 256 (warm-up on cores 10-15 while ours
# compiles, then timed alone) and the matmul rate. Run from the repository root, carrying
# wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_pattnt.sh
#
# Writes under $OUT (7 files): driver.log, jax.log, train_step_bench_vit_b16.json,
# openclip_b256.json, matmul_after.json, attribution_pattnt.json, hlo_*_pattnt.txt.gz.
F=fast+qkv+even+lean+flat+plnres+pgelu+fopt
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
taskset -c 0-9 timeout 470 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $F,$F+pqkv,$F+pqkv+pattnt --mmts $F+pqkv+pattnt --profile $F+pqkv+pattnt \
    --hlo $F+pqkv+pattnt --steps 10 --rounds 5 --deadline-s 455 --timing-s 100 \
    --ready-file /tmp/ready --go-file /tmp/go 2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
attribute $F+pqkv+pattnt pattnt
