#!/bin/bash
# One device call on one H200 (about 4 minutes), issue 17: our ViT-B/16 train step at batch
# 256, +plnres+pgelu beside +plnres+pgelu+fopt (the same model; clipping and Adam's moments on
# one flat vector, `optim.flatten=True`: run 16's HLO has ~800 optimizer kernels, a norm
# reduction and an update per parameter); MM-TS on +fopt; a profile and the HLO of it;
# OpenCLIP ViT-B-16 compiled at 256 (warm-up on cores 10-15 while ours compiles, then timed
# alone) and the matmul rate. Run from the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_fopt.sh
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_b16.json, openclip_b256.json,
# matmul_after.json, attribution_fopt.json, hlo_*_fopt.txt.gz.
F=fast+qkv+even+lean+flat+plnres+pgelu
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
taskset -c 0-9 timeout 470 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $F,$F+fopt --mmts $F+fopt --profile $F+fopt --hlo $F+fopt --steps 10 --rounds 5 \
    --deadline-s 455 --timing-s 90 --ready-file /tmp/ready --go-file /tmp/go 2> "$OUT/jax.log" \
    > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
attribute $F+fopt fopt
