"""docs/clip.md's fine-tuning sequence, end to end through the CLI at tiny size: a random-weight
Hugging Face CLIP (ViT, width 32, CLIP's 49,408-token vocabulary) as safetensors ->
`mmts convert clip` -> `mmts convert clip-tokenizer` -> real JPEG/PNG image-caption pairs ->
`mmts prepare table` -> `mmts cluster` (packaged MiniLM, K-Means) -> `mmts train` with
`configs/clip_vit_b16_finetune.py:mmts`, `init.checkpoint` and zero-shot retrieval before
(`eval.at_start`) and after -> `mmts finetune zero-shot`. Checks that the run started from the
converted parameters and wrote its metrics."""

from __future__ import annotations

import json
import pathlib

import chex
import jax
import numpy as np
from safetensors.numpy import save_file

from mmts_jax.cli import main as cli_main
from mmts_jax.commands.train import parse_config
from mmts_jax.data.sample_images import write_image_folder
from mmts_jax.models.clip import checkpoint
from mmts_jax.models.clip.random_state_dict import random_state_dict

ROOT = pathlib.Path(__file__).resolve().parents[1]
META = json.loads((ROOT / "tests" / "data" / "clip" / "clip_reference.json").read_text())
VOCAB = 49408  # CLIP's BPE: the converted model must embed every id the tokenizer gives
# The stored small HF model (width 128, 2 layers) shrunk: width 32, MLP 128, 1 layer, embed 16.
_DIMS = {128: 32, 512: 128, 64: 16, 1000: VOCAB}


def _write_tiny_hf_clip(directory: pathlib.Path) -> None:
  m = META["models"]["hf_vit_small"]
  keys = [
    (k, tuple(_DIMS.get(d, d) for d in shape)) for k, shape, _ in m["keys"] if ".layers.1." not in k
  ]
  directory.mkdir()
  save_file(random_state_dict(keys, META["seed"]), str(directory / "model.safetensors"))
  cfg = json.loads(json.dumps(m["hf_config"]))
  for side in ("text_config", "vision_config"):
    cfg[side].update(hidden_size=32, intermediate_size=128, num_hidden_layers=1, projection_dim=16)
  cfg["text_config"].update(vocab_size=VOCAB, bos_token_id=VOCAB - 2, eos_token_id=VOCAB - 1)
  cfg["projection_dim"] = 16
  (directory / "config.json").write_text(json.dumps(cfg))


def _records(path: pathlib.Path) -> list[dict]:
  return [json.loads(line) for line in path.read_text().splitlines()]


def test_convert_prepare_cluster_finetune_and_zero_shot_through_the_cli(tmp_path, capsys):
  hf, ckpt, bpe = tmp_path / "hf", tmp_path / "ckpt", tmp_path / "bpe"
  raw, data, clusters, run = (
    tmp_path / "raw",
    tmp_path / "data",
    tmp_path / "clusters.npz",
    tmp_path / "run",
  )
  _write_tiny_hf_clip(hf)
  assert cli_main(["convert", "clip", str(hf), "--out", str(ckpt)]) == 0
  assert cli_main(["convert", "clip-tokenizer", "--out", str(bpe)]) == 0
  tsv = write_image_folder(raw, 48)
  assert cli_main(["prepare", "table", str(tsv), "--images", str(raw), "--out", str(data)]) == 0
  assert (
    cli_main(
      [
        "cluster",
        str(tsv),
        "--text-column",
        "caption",
        "--k",
        "4",
        "--no-plot",
        "--no-progress",
        "--out",
        str(clusters),
      ]
    )
    == 0
  )
  overrides = {
    "model.config_file": ckpt,
    "init.checkpoint": ckpt,
    "data.path": data,
    "data.tokenizer": bpe,
    "data.image_size": 32,
    "data.text_len": 16,
    "mmts.cluster_table": clusters,
    "total_steps": 2,
    "batch_size": 16,
    "optim.warmup_steps": 1,
    "model.dtype": "float32",
    "eval.zero_shot": f"synth={data}",
    "eval.at_start": True,
    "log_every": 1,
    "tensorboard": False,
  }
  config_file = f"{ROOT / 'configs' / 'clip_vit_b16_finetune.py'}:mmts"
  assert (
    cli_main(
      ["train", "--config", config_file, "--workdir", str(run), "--no-progress"]
      + [f"--config.{k}={v}" for k, v in overrides.items()]
    )
    == 0
  )
  capsys.readouterr()

  # The run started from the converted parameters: the trainer's state at step 0 for this
  # configuration holds exactly the converted tree, and the zero-shot numbers it logged as step
  # 0 are those of the converted model.
  config = parse_config(config_file, [(k, str(v)) for k, v in overrides.items()])
  from mmts_jax import train
  from mmts_jax.eval.zero_shot import eval_fn_from_config

  setup = train.setup(config)
  _, converted = checkpoint.load_converted(ckpt)
  chex.assert_trees_all_equal(jax.device_get(setup.state.params), converted["params"])
  records = _records(run / "metrics.jsonl")
  assert [r["step"] for r in records] == [0, 1, 2]
  before = {k: v for k, v in records[0].items() if k.startswith("zs/synth/")}
  assert set(before) == {
    f"zs/synth/{c}" for c in ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "RSUM")
  }
  direct = eval_fn_from_config(config)(0, train.make_embed_fn(setup.model), converted)
  for key, value in before.items():
    np.testing.assert_allclose(value, direct[key], atol=1e-9)
  # MM-TS replaced logit_scale: per-sample temperatures from the cluster table, then an update.
  assert records[1]["temperature_max"] > records[1]["temperature_min"]
  assert all(np.isfinite(r["loss"]) for r in records[1:])
  assert "zs/synth/RSUM" in records[-1]

  # After: `mmts finetune zero-shot` on the run's final checkpoint gives the logged numbers.
  out = tmp_path / "zero_shot.json"
  assert (
    cli_main(
      [
        "finetune",
        "zero-shot",
        "--workdir",
        str(run),
        "--test-set",
        f"synth={data}",
        "--out",
        str(out),
      ]
    )
    == 0
  )
  after = json.loads(out.read_text())["synth"]
  for key, value in after.items():
    np.testing.assert_allclose(value, records[-1][f"zs/synth/{key}"], atol=1e-6)
