#!/bin/bash
# One device call on one H200 (about 9 minutes of command time): GradCache vs plain gradient
# accumulation, ViT-B/16 at a global batch of 32,768 in micro-batches of 512 (issue 15), with
# the step's parts timed first. Run from the repository root, carrying wheels/final (for its
# ml_collections wheel):
#
#   bash benchmarks/h200/grad_cache.sh
#
# Writes under $OUT: driver.log, gc.log (the bench's stage log), grad_cache_bench_vit_b16.json,
# stdout.txt, matmul_after.json.
source "$(dirname "$0")/common.sh"
begin ml_collections
timeout 540 python3 benchmarks/grad_cache_bench.py --out "$OUT" --parts --steps 3 \
    --deadline-s 520 > "$OUT/stdout.txt" 2> "$OUT/gc.log"
el "gradcache rc=$?: $(grep -E '^(grad_cache|plain) ' "$OUT/stdout.txt" | cut -c1-200)"
matmul_after
