#!/bin/bash
# One device call on one H200 (about 5 minutes), issue 17: our ViT-B/16 train step at batch
# 256, +plnres+pgelu+fopt beside +padd+pgelu+fopt (each layer norm after a branch also adds
# the branch and its bias in its forward kernel and returns the bias's gradient from its
# backward kernel, `lean_layer_norm="pallas_add"`); both with the fast-math GELU kernels and
# `optim.flatten`; MM-TS on +padd+pgelu+fopt; a profile and the HLO of it; OpenCLIP ViT-B-16
# compiled at 256 (warm-up on cores 10-15 while ours compiles, then timed alone) and the
# matmul rate. Run from the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_padd.sh
#
# Writes under $OUT (7 files): driver.log, jax.log, train_step_bench_vit_b16.json,
# openclip_b256.json, matmul_after.json, attribution_padd.json, hlo_*_padd_pgelu_fopt.txt.gz.
F=fast+qkv+even+lean+flat
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
taskset -c 0-9 timeout 470 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $F+plnres+pgelu+fopt,$F+padd+pgelu+fopt --mmts $F+padd+pgelu+fopt \
    --profile $F+padd+pgelu+fopt --hlo $F+padd+pgelu+fopt --steps 10 --rounds 5 \
    --deadline-s 455 --timing-s 90 --ready-file /tmp/ready --go-file /tmp/go 2> "$OUT/jax.log" \
    > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
attribute $F+padd+pgelu+fopt padd
