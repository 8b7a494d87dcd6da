"""Every option of every `mmts` command has a description and states its default in `--help`.

The commands are the ones `mmts --help` lists (`mmts_jax.cli.COMMANDS`): a new command is checked
without being added here.
"""

from __future__ import annotations

import argparse
import importlib
import json

import numpy as np
import pytest

from mmts_jax import cli
from mmts_jax.commands import cluster
from mmts_jax.commands import eval as eval_cmd
from mmts_jax.commands.help_format import HelpFormatter


def _parser_of(command: str) -> argparse.ArgumentParser:
  module = importlib.import_module(cli.COMMANDS[command][0])
  build = getattr(module, "build_parser", None) or module._parser
  return build()


def _all(parser: argparse.ArgumentParser, prog: str):
  yield prog, parser
  for action in parser._actions:
    if isinstance(action, argparse._SubParsersAction):
      for name, sub in action.choices.items():
        yield from _all(sub, f"{prog} {name}")


@pytest.mark.parametrize("command", sorted(cli.COMMANDS))
def test_every_option_has_a_description_and_a_default(command):
  checked = 0
  for prog, parser in _all(_parser_of(command), command):
    assert parser.formatter_class is HelpFormatter, prog
    formatter = parser._get_formatter()
    for action in parser._actions:
      if not action.option_strings or isinstance(action, argparse._HelpAction):
        continue
      text = formatter._get_help_string(action)
      assert action.help and action.help.strip(), f"{prog} {action.option_strings[0]}: no help"
      assert "default" in text.lower() or (action.required and "(required)" in text), (
        f"{prog} {action.option_strings[0]}: no default"
      )
      checked += 1
    help_text = parser.format_help()  # renders, with every %(default)s expanded
    assert "%(" not in help_text
  assert checked >= 3, (command, checked)


def test_defaults_are_printed_as_values():
  text = eval_cmd._parser()._subparsers._group_actions[0].choices["retrieval"].format_help()
  text = " ".join(text.split())
  assert "the K of R@K (default: 1 5 10)" in text
  assert "(default: image_emb)" in text
  text = " ".join(cluster.build_parser().format_help().split())
  assert "K-Means clusters (default: 200)" in text and "(default: off)" in text


def test_eval_ek100_val_videos_scores_a_subset(tmp_path, capsys, shared_dir):
  from mmts_jax import cli
  from mmts_jax.eval import ek100_relevancy, mir_metrics, read_ek100_mir, video_subset

  ann_dir = shared_dir / "data" / "ek100"
  ann = read_ek100_mir(ann_dir)
  rng = np.random.default_rng(0)
  video = rng.normal(size=(ann.shape[0], 8)).astype(np.float32)
  text = rng.normal(size=(ann.shape[1], 8)).astype(np.float32)
  np.savez(tmp_path / "emb.npz", video_emb=video, text_emb=text)
  assert (
    cli.main(
      [
        "eval",
        "ek100",
        "--embeddings",
        str(tmp_path / "emb.npz"),
        "--annotations",
        str(ann_dir),
        "--val-videos",
        "500",
        "--out",
        str(tmp_path / "m.json"),
      ]
    )
    == 0
  )
  out = capsys.readouterr().out
  keep_v, keep_c = video_subset(ann, 500)
  assert f"EK-100 MIR: 500 videos x {len(keep_c)} captions" in out
  assert 0 < len(keep_c) < ann.shape[1]
  # The same numbers as scoring the slice directly (independent of the CLI's slicing code).
  v = video / np.linalg.norm(video, axis=1, keepdims=True)
  t = text / np.linalg.norm(text, axis=1, keepdims=True)
  sim = (v[keep_v] @ t[keep_c].T).astype(np.float32)
  want = mir_metrics(sim, ek100_relevancy(ann)[np.ix_(keep_v, keep_c)])
  got = json.loads((tmp_path / "m.json").read_text())["metrics"]
  assert got["mAP/average"] == pytest.approx(want["mAP"].average, abs=1e-6)
  assert got["nDCG/average"] == pytest.approx(want["nDCG"].average, abs=1e-6)


def test_eval_ek100_val_videos_takes_ids_from_a_list_or_a_file(tmp_path, capsys, shared_dir):
  from mmts_jax import cli
  from mmts_jax.eval import ek100_relevancy, mir_metrics, read_ek100_mir

  ann_dir = shared_dir / "data" / "ek100"
  ann = read_ek100_mir(ann_dir)
  rng = np.random.default_rng(1)
  sim = rng.normal(size=ann.shape).astype(np.float32)
  np.save(tmp_path / "sim.npy", sim)
  # Three videos that have captions of their own (so every query has a relevant caption), given
  # out of the CSV's order and with a repeat.
  row_of = {v: i for i, v in enumerate(ann.video_ids)}
  captioned = sorted({row_of[c] for c in ann.caption_ids})
  rows = np.array([captioned[10], captioned[len(captioned) // 2], captioned[-10]])
  picked = [ann.video_ids[i] for i in (rows[2], rows[0], rows[1], rows[0])]
  base = ["eval", "ek100", "--similarity", str(tmp_path / "sim.npy"), "--annotations", str(ann_dir)]
  (tmp_path / "ids.txt").write_text("\n".join(picked) + "\n\n")
  cols = np.array([j for j, c in enumerate(ann.caption_ids) if c in set(picked)])
  want = mir_metrics(sim[np.ix_(rows, cols)], ek100_relevancy(ann)[np.ix_(rows, cols)])
  for spec in (",".join(picked), str(tmp_path / "ids.txt")):
    out = tmp_path / "m.json"
    assert cli.main([*base, "--val-videos", spec, "--out", str(out)]) == 0
    assert f"EK-100 MIR: 3 videos x {len(cols)} captions" in capsys.readouterr().out
    got = json.loads(out.read_text())["metrics"]
    assert got["mAP/average"] == pytest.approx(want["mAP"].average, abs=1e-6)
    assert got["nDCG/video_to_text"] == pytest.approx(want["nDCG"].video_to_text, abs=1e-6)
  # An unknown id is named, in one line, with exit status 2.
  assert cli.main([*base, "--val-videos", f"{picked[0]},P99_99_0"]) == 2
  err = capsys.readouterr().err
  assert "--val-videos" in err and "1 unknown video id(s)" in err and "'P99_99_0'" in err
  (tmp_path / "empty.txt").write_text("\n")
  assert cli.main([*base, "--val-videos", str(tmp_path / "empty.txt")]) == 2
  assert "holds no video id" in capsys.readouterr().err
