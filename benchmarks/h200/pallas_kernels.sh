#!/bin/bash
# One device call on one H200 (about 2 minutes): the Pallas layer norm and bias+GELU kernels at
# the train step's shapes beside the XLA form and PyTorch (errors against float32, times, a
# block-size sweep on the ViT-B/16 shape). Run from the repository root, carrying wheels/final:
#
#   bash benchmarks/h200/pallas_kernels.sh
#
# Writes under $OUT: driver.log, pallas_kernels_bench.json, kernels.log.
source "$(dirname "$0")/common.sh"
begin ml_collections
timeout 400 python3 benchmarks/pallas_kernels_bench.py --out "$OUT" --torch \
    > "$OUT/kernels.log" 2>&1
el "kernels rc=$?"
tail -c 3000 "$OUT/kernels.log"
