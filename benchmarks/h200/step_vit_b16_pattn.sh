#!/bin/bash
# One device call on one H200 (about 6 minutes), issue 17: pallas_attention's fused
# short-sequence attention kernels. First the kernels alone at the B/16 towers' attention shapes
# beside cuDNN and XLA (benchmarks/attention_kernel_bench.py: errors, fwd and fwd+bwd times, a
# block-size sweep), with the GPU to themselves; then our ViT-B/16 train step at batch 256,
# +plnres+pgelu+fopt (the reference) beside the same with attention="pallas" in both towers
# (+pattn), a profile of +pattn; OpenCLIP ViT-B-16 compiled at 256 (warm-up on cores 10-15
# while ours compiles, then timed alone) and the matmul rate. Run from the repository root,
# carrying wheels/final:
#
#   bash benchmarks/h200/step_vit_b16_pattn.sh
#
# Writes under $OUT (7 files): driver.log, attention_kernel_bench.json, jax.log,
# train_step_bench_vit_b16.json, openclip_b256.json, matmul_after.json, attribution_pattn.json.
F=fast+qkv+even+lean+flat+plnres+pgelu+fopt
source "$(dirname "$0")/common.sh"
begin ml_collections open_clip_torch ftfy wcwidth
timeout 120 python3 benchmarks/attention_kernel_bench.py --out "$OUT" --reps 10 \
    > /tmp/attn_kernels.log 2>&1
el "attention kernels rc=$?: $(tail -c 1500 /tmp/attn_kernels.log)"
warm_openclip 256
taskset -c 0-9 timeout 400 python3 benchmarks/train_step_bench.py --out "$OUT" --batch 256 \
    --variants $F,$F+pattn --profile $F+pattn --steps 10 --rounds 5 \
    --deadline-s 385 --timing-s 90 --ready-file /tmp/ready --go-file /tmp/go 2> "$OUT/jax.log" \
    > /tmp/jax_stdout.json
el "ours rc=$?: $(ours_medians)"
openclip_after_ours 256
attribute $F+pattn pattn
