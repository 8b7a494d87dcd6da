#!/bin/bash
# One device call on one H200 (about 7 minutes), issue 17: session 7's unmeasured candidates in
# one run. (1) The attention kernels alone vs cuDNN and XLA (`attention_kernel_bench.py`, block
# sweep). (2) Our ViT-B/16 train step at batch 256: the fastest so far (+plnres+pgelu+fopt,
# run 19) beside +pqkv (the q/k/v join kernel), +pattn (the Pallas attention kernels) and
# +pqkv+pattn; MM-TS and a profile on +pqkv+pattn; OpenCLIP ViT-B-16 compiled at 256 (warm-up
# on cores 10-15 while ours compiles, then timed alone) and the matmul rate. Run from the
# repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_candidates.sh
#
# Writes under $OUT (7 files): driver.log, attention_kernel_bench.json, jax.log,
# train_step_bench_vit_b16.json, openclip_b256.json, matmul_after.json, attribution_cand.json.
F=fast+qkv+even+lean+flat+plnres+pgelu+fopt
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
timeout 120 python3 benchmarks/attention_kernel_bench.py --out "$OUT" --reps 10 \
    > /tmp/attn_kernels.log 2>&1
el "attention kernels rc=$?: $(tail -c 1500 /tmp/attn_kernels.log)"
warm_openclip 256
taskset -c 0-9 timeout 430 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $F,$F+pqkv,$F+pattn,$F+pqkv+pattn --mmts $F+pqkv+pattn --profile $F+pqkv+pattn \
    --steps 10 --rounds 5 --deadline-s 415 --timing-s 100 --ready-file /tmp/ready \
    --go-file /tmp/go 2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
attribute $F+pqkv+pattn cand
