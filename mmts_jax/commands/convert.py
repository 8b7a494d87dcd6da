"""`mmts convert clip SRC --out DIR`: a PyTorch CLIP checkpoint -> an orbax checkpoint of this
package's Flax CLIP (`{"params": ...}`) plus `DIR/clip_config.json`.

SRC is an OpenAI / OpenCLIP state dict or a Hugging Face `CLIPModel` (a directory with
`model.safetensors` and `config.json`, or the file): `.safetensors` and `.npz` are read without
pickle; `.pt` / `.pth` / `.bin` pickles only where PyTorch is installed. The trainer restores
DIR with `--config.init.checkpoint=DIR`; docs/clip.md has the details.

  mmts convert clip ViT-B-16.safetensors --out ckpt/clip_b16 --act quick_gelu
  mmts convert clip hf_clip_dir/ --out ckpt/clip_b16_hf

`mmts convert clip-tokenizer --out DIR` writes CLIP's BPE as a tokenizer directory
(`tokenizer.json`) for the input pipeline (`--config.data.tokenizer=DIR`): same ids as
`mmts_jax.models.clip.tokenizer.ClipTokenizer`, padded with 0.
"""

from __future__ import annotations

import argparse
import json
import sys

from mmts_jax.commands.help_format import HelpFormatter

TARGETS = ("clip", "clip-tokenizer")


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
    prog="mmts convert", description=__doc__, formatter_class=HelpFormatter
  )
  p.add_argument(
    "target",
    choices=TARGETS,
    help="clip: a checkpoint; clip-tokenizer: CLIP's BPE as a tokenizer directory "
    "(no default; required)",
  )
  p.add_argument(
    "src",
    nargs="?",
    default=None,
    help="checkpoint file or Hugging Face directory (required for clip; default: none)",
  )
  p.add_argument("--out", required=True, help="output directory (no default; required)")
  p.add_argument(
    "--context-length",
    type=int,
    default=77,
    help="clip-tokenizer: ids per caption (default: %(default)s)",
  )
  p.add_argument(
    "--format",
    choices=("auto", "openclip", "hf"),
    default="auto",
    help="state-dict naming: OpenAI/OpenCLIP or Hugging Face (default: %(default)s, "
    "from the key names)",
  )
  p.add_argument(
    "--act",
    choices=("auto", "quick_gelu", "gelu"),
    default="auto",
    help="MLP activation: quick_gelu for OpenAI weights, gelu for OpenCLIP's LAION "
    "weights (default: %(default)s = the HF config's hidden_act, else "
    "quick_gelu)",
  )
  p.add_argument(
    "--vision-heads",
    type=int,
    default=None,
    help="image-tower heads (default: width/64, or the HF config's)",
  )
  p.add_argument(
    "--text-heads",
    type=int,
    default=None,
    help="text-tower heads (default: width/64, or the HF config's)",
  )
  p.add_argument(
    "--overwrite", action="store_true", help="replace an existing --out directory (default: refuse)"
  )
  return p


def main(argv=None) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if args.target == "clip-tokenizer":
    from mmts_jax.models.clip.tokenizer import write_tokenizer_dir

    try:
      out = write_tokenizer_dir(args.out, context_length=args.context_length)
    except FileNotFoundError as e:
      print(f"mmts convert clip-tokenizer: {e}", file=sys.stderr)
      return 2
    print(f"wrote {out / 'tokenizer.json'} (use --config.data.tokenizer={out})")
    return 0
  if args.src is None:
    parser.error("clip needs SRC, the checkpoint to convert")
  from mmts_jax.models.clip import checkpoint, convert, state_dict_io

  try:
    sd, hf_config = state_dict_io.load_state_dict(args.src)
    sd = convert.strip_prefixes(sd)
    fmt = convert.detect_format(sd) if args.format == "auto" else args.format
    overrides = {
      k: v
      for k, v in (("vision_heads", args.vision_heads), ("text_heads", args.text_heads))
      if v is not None
    }
    cfg = convert.infer_config(
      sd, fmt, act=None if args.act == "auto" else args.act, hf_config=hf_config, **overrides
    )
    params = convert.convert_state_dict(sd, cfg, fmt)
    checkpoint.save_converted(
      args.out, params, cfg, source=str(args.src), fmt=fmt, overwrite=args.overwrite
    )
  except (ValueError, FileNotFoundError, FileExistsError) as e:
    print(f"mmts convert clip: {e}", file=sys.stderr)
    return 2
  _, meta = checkpoint.read_config(args.out)
  print(json.dumps({"out": str(args.out), **meta}, indent=2, sort_keys=True))
  if args.act == "auto" and not (hf_config and "text_config" in hf_config):
    print(
      "note: activation quick_gelu assumed (OpenAI weights); OpenCLIP's LAION-trained "
      "weights need --act gelu",
      file=sys.stderr,
    )
  return 0


if __name__ == "__main__":
  sys.exit(main())
