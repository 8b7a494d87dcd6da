#!/bin/bash
# One device call on one H200 (about 5.5 minutes of command time): our ViT-B/16 train step at
# batch 256 for run 7's candidates (benchmarks/results/train_step_h200_run7/: the lean layer norm
# and GELU cut XLA's step memory from 24.1 to 19.9 GiB at the same speed; the layer norms still
# run on a residual stream stored as (L, C, B)): fast+qkv+even+lean (run 7's reference) beside
# +flat (a 2-D residual stream), +gelu+cudnnln (XLA's cuDNN layer-norm rewrite on Flax's layer
# norm), +textxla (XLA attention in the 78-token text tower), +lt (cuBLASLt, bias+GELU epilogue
# fusion), +tgany (Triton GEMMs with fused operands wherever XLA can) and all of flat, textxla and
# lt together; MM-TS on the combination; profiles and the optimised HLO of +flat and of the
# combination; OpenCLIP ViT-B-16 compiled at 256 (warm-up on cores 10-15 while ours compiles,
# then timed alone) and the matmul rate. Run from the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_s5.sh
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_b16.json, openclip_b256.json,
# matmul_after.json, attribution_all.json, hlo_fast_qkv_even_lean_flat.txt.gz and the
# combination's hlo_*.txt.gz (8 files).
L=fast+qkv+even+lean
ALL=$L+flat+textxla+lt
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
# Eight executables compile side by side (run 7: six in 95 s); the cut is at 330 - 60 s.
taskset -c 0-9 timeout 345 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $L,$L+flat,fast+qkv+even+gelu+cudnnln,$L+textxla,$L+lt,$L+tgany,$ALL \
    --mmts $ALL --profile $ALL,$L+flat --hlo $L+flat,$ALL --steps 10 --rounds 5 \
    --deadline-s 330 --timing-s 60 --ready-file /tmp/ready --go-file /tmp/go \
    2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
# The attribution's table goes to stdout (the call's output tail), its json under $OUT.
timeout 40 python3 benchmarks/profile_attribution.py "$OUT" --variant $ALL \
    --out "$OUT/attribution_all.json" 2>&1 | head -45
el "attribution rc=$?"
