#!/bin/bash
# One device call on one H200 (about 9 minutes), issue 17: the variant F (default: run 23's
# fastest ViT-B/16 step, +pqkv+pattnt) at batch 512 beside OpenCLIP ViT-B-16 compiled at 512,
# with MM-TS, then the same variant of ViT-L/14 at batch 256 (and with MM-TS: the bench's
# default --mmts is the first variant) beside OpenCLIP ViT-L-14 compiled at 256. The L/14 half
# missed its compile cut in runs 20 and 24 (not compiled 94 s / 113 s after lowering): for
# L/14 use step_vit_l14.sh, which leaves about 300 s.
# Each OpenCLIP side warms up on cores 10-15 while ours compiles, then is timed alone. Run from
# the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_b512_l14.sh     # run 24; run 20: F=${F:-fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattnt}
#
# Writes under $OUT (7 files): driver.log, train_step_bench_vit_b16.json, openclip_b512.json,
# matmul_after.json, train_step_bench_vit_l14.json, openclip_l14_b256.json, logs.tgz (both
# benches' stderr).
F=${F:-fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattnt}
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_openclip 512
taskset -c 0-9 timeout 230 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 512 \
    --variants $F --mmts $F --steps 10 --rounds 3 --deadline-s 220 --timing-s 60 \
    --ready-file /tmp/ready --go-file /tmp/go 2> /tmp/jax_b512.log > /tmp/jax_stdout.json
el "ours b512 rc=$?: $(ours_medians)"
openclip_after_ours 512
warm_peer_then_go "timeout 240 python3 benchmarks/openclip_step_peer.py ViT-L-14 256 compile \
    > /tmp/oc_warm.json 2> /tmp/oc_warm.err"
taskset -c 0-9 timeout 310 python3 benchmarks/train_step_bench.py --out "$OUT" --model vit_l14 \
    --batch 256 --variants $F --steps 5 --rounds 3 --deadline-s 300 --timing-s 25 \
    --ready-file /tmp/ready --go-file /tmp/go 2> /tmp/jax_l14.log > /tmp/jax_stdout.json
el "ours l14 rc=$?: $(ours_medians) $(grep -o '"[^"]*_mmts_overhead_pct": [^,]*' /tmp/jax_stdout.json)"
touch /tmp/ready /tmp/go
wait
el "openclip warm: $(head -c 300 /tmp/oc_warm.json) $(tail -c 300 /tmp/oc_warm.err)"
peer_alone openclip_l14_b256.json python3 benchmarks/openclip_step_peer.py ViT-L-14 256 compile
tar czf "$OUT/logs.tgz" -C /tmp jax_b512.log jax_l14.log
