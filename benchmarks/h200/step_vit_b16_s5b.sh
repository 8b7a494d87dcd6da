#!/bin/bash
# One device call on one H200 (about 8.5 minutes of command time): our ViT-B/16 train step at
# batch 256 for run 8's fastest, fast+qkv+even+lean+flat (84.6 ms), beside +causal (the text
# tower's fused attention with the causal mask alone, `causal_only_lengths`), without the fused
# q/k/v product, and +split (the fused product's backward per q, k, v); MM-TS on +causal; both
# +flat and +flat+causal at batch 512; a profile and the optimised HLO of +causal (attributed on
# the device afterwards); OpenCLIP ViT-B-16 compiled at 256 and 512 (warm-ups on cores 10-15
# while ours compiles, then each timed alone) and the matmul rate. Run from the repository
# root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_s5b.sh
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_b16.json, openclip_b256.json,
# openclip_b512.json, matmul_after.json, attribution_causal.json, hlo_*_causal.txt.gz.
F=fast+qkv+even+lean+flat
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256 512
taskset -c 0-9 timeout 470 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256,512 \
    --variants $F,$F+causal,fast+even+lean+flat,$F+split --later-variants $F,$F+causal \
    --mmts $F+causal --profile $F+causal --hlo $F+causal --steps 10 --rounds 5 \
    --deadline-s 455 --timing-s 90 --ready-file /tmp/ready --go-file /tmp/go \
    2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256 512
timeout 40 python3 benchmarks/profile_attribution.py "$OUT" --variant $F+causal \
    --out "$OUT/attribution_causal.json" 2>&1 | tail -18
el "attribution rc=$?"
