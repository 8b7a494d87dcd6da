#!/bin/bash
# One device call on one H200 (about 6 minutes), issue 17: run 22's fastest ViT-B/16 train
# step at batch 256 (+pqkv+pattnt; 3.8 ms of its 80.45 ms had no kernel running) beside the
# same executable under XLA's command-buffer (CUDA graph) settings: +cb1 (graphs from one
# kernel up), +cbconc (independent commands of a graph run concurrently), +nocb (no command
# buffers: the control); MM-TS on +pqkv+pattnt; a profile and the HLO of +cbconc; OpenCLIP
# ViT-B-16 compiled at 256 (warm-up on cores 10-15 while ours compiles, then timed alone) and
# the matmul rate. Run from the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_cb.sh
#
# Writes under $OUT (7 files): driver.log, jax.log, train_step_bench_vit_b16.json,
# openclip_b256.json, matmul_after.json, attribution_cbconc.json, hlo_*_cbconc.txt.gz.
B=fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattnt
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 256
taskset -c 0-9 timeout 470 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $B,$B+cb1,$B+cbconc,$B+nocb --mmts $B --profile $B+cbconc --hlo $B+cbconc \
    --steps 10 --rounds 5 --deadline-s 455 --timing-s 120 --ready-file /tmp/ready \
    --go-file /tmp/go 2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
attribute $B+cbconc cbconc
