#!/bin/bash
# One device call on one H200 (about 6 minutes), issue 17: the Pallas GELU kernels' sigmoid
# form with ex2.approx / rcp.approx (`GeluConfig.fast_math`, the default now) against their
# exact maths, (1) alone at the step's shapes (`pallas_kernels_bench.py`, whose sweep holds
# the default blocks with fast_math off) and (2) in our ViT-B/16 train step at batch 256:
# +plnres+pgelu+exactgelu (the previous code) beside +plnres+pgelu (fast GELU) and
# +plnres+pgelu+fopt (fast GELU + `optim.flatten`), MM-TS on +fopt, a profile and the HLO of
# it, OpenCLIP ViT-B-16 compiled at 256 (warm-up on cores 10-15 while ours compiles, then timed
# alone) and the matmul rate. Run from the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_fastgelu.sh
#
# Writes under $OUT: driver.log, kernels.log, pallas_kernels_bench.json, jax.log,
# train_step_bench_vit_b16.json, openclip_b256.json, matmul_after.json, attribution_fgelu.json,
# hlo_*_fopt.txt.gz.
F=fast+qkv+even+lean+flat+plnres+pgelu
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
timeout 150 python3 benchmarks/pallas_kernels_bench.py --out "$OUT" > "$OUT/kernels.log" 2>&1
el "kernels rc=$?"
grep -E "gelu|GELU" "$OUT/kernels.log" | tail -12
warm_openclip 256
taskset -c 0-9 timeout 400 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $F+exactgelu,$F,$F+fopt --mmts $F+fopt --profile $F+fopt --hlo $F+fopt \
    --steps 10 --rounds 5 --deadline-s 385 --timing-s 80 --ready-file /tmp/ready \
    --go-file /tmp/go 2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
attribute $F+fopt fgelu
