#!/bin/bash
# The command of run 4 (carried as wheels/final/run.sh with wheels/final/whl/{ml_collections,
# open_clip_torch,ftfy,wcwidth}*.whl and ../shared/peers/peer_openclip_step.py beside it).
cd "$(dirname "$0")/../.."
python3 -m pip install -q --no-index --no-deps --target /tmp/site wheels/final/whl/*.whl
export PYTHONPATH=/tmp/site:$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
T0=$(date +%s); el() { echo "[$(( $(date +%s) - T0 )) s] $*" | tee -a $OUT/driver.log; }
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv >> $OUT/driver.log
el start
# Untimed OpenCLIP warm-up (fills the TorchInductor cache) on cores 10-15 while ours compiles on 0-9.
( taskset -c 10-15 timeout 200 python3 wheels/final/peer_openclip_step.py 256 compile > /tmp/oc_warm.json 2> /tmp/oc_warm.err; touch /tmp/oc_done ) &
( while [ ! -f /tmp/ready ]; do sleep 1; done; while [ ! -f /tmp/oc_done ]; do sleep 1; done; el "go (ours compiled, OpenCLIP warm done)"; touch /tmp/go ) &
taskset -c 0-9 timeout 300 python3 benchmarks/train_step_bench.py --out $OUT --variants fast,base --mmts fast --steps 10 --rounds 5 --deadline-s 290 --compile-s 220 --ready-file /tmp/ready --go-file /tmp/go 2> $OUT/jax.log > $OUT/jax_stdout.json
el "ours rc=$?"
touch /tmp/ready /tmp/go
wait
el "openclip warm: $(cat /tmp/oc_warm.json | head -c 300)"
timeout 90 python3 wheels/final/peer_openclip_step.py 256 compile > $OUT/openclip_b256.json 2> $OUT/openclip.err
el "openclip timed rc=$?: $(cat $OUT/openclip_b256.json)"
python3 benchmarks/matmul_rate.py > $OUT/matmul_after.json 2>&1
el "matmul after: $(cat $OUT/matmul_after.json)"
