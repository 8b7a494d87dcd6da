#!/bin/bash
# One device call on one H200 (about 4 minutes), issue 17: our ViT-B/16 train step at batch
# 256, +pln+pgelu beside +plnres+pgelu (the same, with each block's two layer norms adding the
# skip connection's cotangent to dx inside their Pallas backward kernel: no separate residual
# add per layer norm in the backward pass, `lean_layer_norm="pallas_res"`); MM-TS on
# +plnres+pgelu; a profile and the HLO of it; OpenCLIP ViT-B-16 compiled at 256 (warm-up on
# cores 10-15 while ours compiles, then timed alone) and the matmul rate. Run from the
# repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_plnres.sh
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_b16.json, openclip_b256.json,
# matmul_after.json, attribution_plnres.json, hlo_*_plnres_pgelu.txt.gz.
F=fast+qkv+even+lean+flat
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
taskset -c 0-9 timeout 470 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $F+pln+pgelu,$F+plnres+pgelu --mmts $F+plnres+pgelu \
    --profile $F+plnres+pgelu --hlo $F+plnres+pgelu --steps 10 --rounds 5 --deadline-s 455 \
    --timing-s 90 --ready-file /tmp/ready --go-file /tmp/go 2> "$OUT/jax.log" \
    > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
attribute $F+plnres+pgelu plnres
