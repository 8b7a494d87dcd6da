#!/bin/bash
# One device call on two H200s (about 1.5 minutes): the Pallas layer norm and bias+GELU with the
# rows sharded over both GPUs (`row_partitioning`) beside XLA's form under the same sharding:
# errors, the collectives of each compiled program, times. Run from the repository root on the
# nvidia-h200-x2 kind, carrying wheels/final:
#
#   bash benchmarks/h200/pallas_sharded.sh
#
# Writes under $OUT: driver.log, pallas_sharded_check.json, sharded.log.
source "$(dirname "$0")/common.sh"
begin ml_collections
timeout 300 python3 benchmarks/pallas_sharded_check.py --out "$OUT" > "$OUT/sharded.log" 2>&1
el "sharded rc=$?"
tail -c 3000 "$OUT/sharded.log"
