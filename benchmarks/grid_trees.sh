#!/usr/bin/env bash
# Alternating `loss_bench.py one` processes over (source tree, loss, dtype[, block rows, cols])
# configurations at B = 131,072 (or $B), one JSON line each, round after round, so every
# configuration sees the same machine and the same drift. A tree is a folder holding an
# `mmts_jax` package (`git archive <commit> mmts_jax | tar -x -C trees/<name>`), put first on
# PYTHONPATH; the benchmark script is this checkout's. Lines are appended as they finish, so a
# run cut short keeps what it measured; no new process starts after DEADLINE_S seconds.
#
#   bash benchmarks/grid_trees.sh OUT.jsonl ROUNDS DEADLINE_S TREES_DIR \
#       "main infonce bf16" "new infonce bf16 16384 8192" ...
set -u
out=$1 rounds=$2 deadline=$3 trees=$4
shift 4
cfgs=("$@")
start=$(date +%s)
here=$(cd "$(dirname "$0")" && pwd)
for r in $(seq 1 "$rounds"); do
  for c in "${cfgs[@]}"; do
    read -r tree loss dtype br bc <<<"$c"
    if [ $(($(date +%s) - start)) -gt "$deadline" ]; then
      echo "deadline reached in round $r" >&2
      exit 0
    fi
    block=()
    if [ -n "${br:-}" ]; then block=(--block "$br" "$bc"); fi
    line=$(PYTHONPATH="$trees/$tree" timeout 100 python3 "$here/loss_bench.py" one --impl blockwise \
      --B "${B:-131072}" --dtype "$dtype" --loss "$loss" "${block[@]}" | tail -1)
    echo "{\"tree\": \"$tree\", \"round\": $r, \"result\": ${line:-null}}" >>"$out"
    echo "$c: $line" | cut -c1-160
  done
done
