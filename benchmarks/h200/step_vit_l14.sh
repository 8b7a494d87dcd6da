#!/bin/bash
# One device call on one H200 (up to 9 minutes of command time): our ViT-L/14 train step at
# batch $BATCH (default 256; variants $VARIANT, a comma list, default fast+qkv+even; MM-TS on $MMTS, default
# the same; MMTS= for none) beside OpenCLIP ViT-L-14 compiled at $BATCH
# (`benchmarks/openclip_step_peer.py`). Our executables get until second $DEADLINE (default
# 480) minus 30 to compile: run 24's L/14 half (+pqkv+pattnt with MM-TS, 2 executables) had
# not compiled 113 s after lowering.
# Run from the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_l14.sh
#   VARIANT=fast+qkv+even+lean+flat bash benchmarks/h200/step_vit_l14.sh   # run 10
#   F=fast+qkv+even+lean+flat; VARIANT=$F+pln+pgelu,$F MMTS=$F+pln+pgelu \
#       bash benchmarks/h200/step_vit_l14.sh                                  # run 13
#   VARIANT=fast+qkv+even+lean+flat+plnres+pgelu+fopt+pqkv+pattnt MMTS= \
#       bash benchmarks/h200/step_vit_l14.sh                 # run 25 (batch 256)
#   XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 BATCH=512 VARIANT=<run 25's> MMTS= \
#       bash benchmarks/h200/step_vit_l14.sh                 # run 27 (batch 512)
#   Batch 512 needs 114.9 GiB (OpenCLIP 117.25): over the 75% of the card that JAX takes by
#   default, hence the memory fraction (run 26, without it, ran out of memory at the first
#   step). 1,024 was not tried: twice the activations of 512 exceed the card on either side.
#
# Writes under $OUT: driver.log, jax.log, train_step_bench_vit_l14.json,
# openclip_l14_b$BATCH.json.
V=${VARIANT:-fast+qkv+even}
M=${MMTS-$V}
D=${DEADLINE:-480}
B=${BATCH:-256}
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
warm_peer_then_go "timeout 240 python3 benchmarks/openclip_step_peer.py ViT-L-14 $B compile \
    > /tmp/oc_warm.json 2> /tmp/oc_warm.err"
# JAX_LOG_COMPILES: jax.log gets each compilation's time (the setup took 130 s in run 24).
JAX_LOG_COMPILES=1 taskset -c 0-9 timeout $((D + 10)) python3 benchmarks/train_step_bench.py \
    --out "$OUT" --model vit_l14 --batch $B --variants $V --mmts "$M" --steps 5 --rounds 3 \
    --deadline-s "$D" --timing-s 30 --ready-file /tmp/ready --go-file /tmp/go \
    2> "$OUT/jax.log" > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians) $(grep -o '"[^"]*_mmts_overhead_pct": [^,]*' /tmp/jax_stdout.json)"
touch /tmp/ready /tmp/go
wait
el "openclip warm: $(head -c 300 /tmp/oc_warm.json) $(tail -c 300 /tmp/oc_warm.err)"
peer_alone openclip_l14_b$B.json python3 benchmarks/openclip_step_peer.py ViT-L-14 $B compile
