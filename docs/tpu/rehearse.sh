#!/usr/bin/env bash
# Runs every command of docs/tpu.md against a local GCS emulator and prints each as "$ command"
# followed by its output (the transcript docs/tpu/transcript.txt). From the repository root:
#
#   bash docs/tpu/rehearse.sh > docs/tpu/transcript.txt 2>&1
#
# Needs the dev extra (gcp-storage-emulator), port 9023 free and ~5 minutes on 2 CPU cores. The
# retrieval metrics json it reads back from gs:// is copied to docs/tpu/mini_test.json.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY="${PYTHON:-python}"
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
mmts() { "$PY" -m mmts_jax.cli "$@"; }
python() { "$PY" "$@"; }
show() {  # show COMMAND: print it, run it, print its output without absl's start-up chatter
  printf '$ %s\n' "$*"
  eval "$@" 2>&1 | grep -v "google_auth_provider\|absl::InitializeLog\|^WARNING: All log messages"
  echo
}
rm -rf /tmp/mini
"$PY" tests/gcs_emulator.py --port 9023 --bucket my-bucket > /tmp/mini_emulator.log 2>&1 &
EMU=$!
trap 'kill $EMU' EXIT
sleep 2
printf '$ python tests/gcs_emulator.py --port 9023 --bucket my-bucket &\n%s\n\n' \
  "$(head -n 1 /tmp/mini_emulator.log)"
export STORAGE_EMULATOR_HOST=http://127.0.0.1:9023 TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:9023 \
  CLOUD_STORAGE_EMULATOR_ENDPOINT=http://127.0.0.1:9023 GOOGLE_AUTH_TOKEN_FOR_TESTING=emulator \
  GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
show "python -c 'from mmts_jax.data.sample_images import write_image_folder; write_image_folder(\"/tmp/mini\", 160)'"
show "head -n 129 /tmp/mini/pairs.tsv > /tmp/mini/train.tsv"
show "(head -n 1 /tmp/mini/pairs.tsv; tail -n 32 /tmp/mini/pairs.tsv) > /tmp/mini/test.tsv"
show "mmts prepare table /tmp/mini/train.tsv --images /tmp/mini --out gs://my-bucket/data/mini"
show "mmts prepare table /tmp/mini/test.tsv --images /tmp/mini --out gs://my-bucket/data/mini_test"
show "mmts prepare inspect gs://my-bucket/data/mini --num 1"
show "mmts cluster /tmp/mini/train.tsv --text-column caption --k 8 --sh-min 0.05 --sh-max 0.10 --no-progress --out gs://my-bucket/tables/mini_k8.npz"
ARGS="--config.data.path=gs://my-bucket/data/mini --config.mmts.cluster_table=gs://my-bucket/tables/mini_k8.npz --config.eval.zero_shot=test=gs://my-bucket/data/mini_test"
show "launch/tpu_pod.sh start --tpu my-v4-32 --zone us-central2-b --setup --repo https://github.com/you/mmts_jax.git --python python3.11 --config configs/records_tiny.py --workdir gs://my-bucket/runs/mini --dry-run -- $ARGS"
show "mmts train --config configs/records_tiny.py --workdir gs://my-bucket/runs/mini $ARGS --stop-at-step 10"
show "mmts train --config configs/records_tiny.py --workdir gs://my-bucket/runs/mini $ARGS"
show "python -c 'from etils import epath; [print(p) for p in sorted(epath.Path(\"gs://my-bucket/runs/mini\").iterdir())]; print(sorted(p.name for p in epath.Path(\"gs://my-bucket/runs/mini/checkpoints\").iterdir()))'"
show "python -c 'from mmts_jax.metrics_log import read_metrics; r = read_metrics(\"gs://my-bucket/runs/mini\"); print(len(r), \"records, steps\", [x[\"step\"] for x in r]); print({k: round(v, 4) for k, v in r[-1].items() if k.startswith(\"zs/\")})'"
show "python docs/tpu/export.py"
show "mmts eval retrieval --embeddings gs://my-bucket/eval/mini_test_emb.npz --out gs://my-bucket/eval/mini_test.json"
show "python -c 'from etils import epath; print(epath.Path(\"gs://my-bucket/eval/mini_test.json\").read_text()[:200])'"
"$PY" -c 'from etils import epath; print(epath.Path("gs://my-bucket/eval/mini_test.json").read_text(), end="")' > docs/tpu/mini_test.json
