#!/bin/bash
# One device call on one H200 (run 5, about 6 minutes of command time): our ViT-B/16 train step
# at batch 256 (variants fast, fast+qkv, fast+notriton, fast+dots, and fast with MM-TS) and 512
# (fast), beside OpenCLIP ViT-B-16 compiled at 256 and 512, and the card's bf16 matmul rate.
# Run from the repository root, carrying the ignored folder wheels/final:
#
#   bash benchmarks/h200/step_vit_b16.sh
#
# wheels/final/ holds whl/ (the wheels listed in BENCHMARKS.md, "End to end from files") and
# peer_openclip_step.py (copied from ../shared/peers/). OpenCLIP's warm-ups run on cores 10-15
# while ours is set up and compiled on cores 0-9 (common.sh); ours is timed once both are done,
# then each OpenCLIP batch is timed alone (cache hit). Writes under $OUT: driver.log, jax.log,
# train_step_bench_vit_b16.json, openclip_b256.json, openclip_b512.json, matmul_after.json.
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256 512
taskset -c 0-9 timeout 465 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256,512 \
    --variants fast,fast+qkv,fast+notriton,fast+dots --later-variants fast --mmts fast \
    --profile fast --steps 10 --rounds 5 --deadline-s 450 --timing-s 90 \
    --ready-file /tmp/ready --go-file /tmp/go 2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(grep -o '"fast_mmts_overhead_pct": [^,]*' /tmp/jax_stdout.json)"
openclip_after_ours 256 512
