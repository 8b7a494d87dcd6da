"""PyTorch CLIP state dicts (OpenAI / OpenCLIP naming, or Hugging Face `CLIPModel` naming) ->
this package's Flax parameter tree.

Every Flax leaf comes from named source tensors by one rule:

  * Linear `weight (out, in)` -> `kernel (in, out)` (transpose); bias as is.
  * Conv `weight (out, in, kh, kw)` -> `kernel (kh, kw, in, out)`.
  * OpenCLIP's fused `attn.in_proj_weight (3w, w)` -> `q/k/v_proj.kernel`, rows [0:w], [w:2w],
    [2w:3w], each transposed (HF stores q/k/v separately).
  * BatchNorm `(gamma, beta, mean, var)` -> frozen `scale = gamma / sqrt(var + 1e-5)`,
    `bias = beta - mean * scale` (computed in float64).
  * Raw parameters (`class_embedding`, `positional_embedding`, `proj`, `text_projection`,
    `logit_scale`) as is; HF's `visual_projection` / `text_projection` Linear weights transposed.

Buffers that carry no weights (`position_ids`, `attn_mask`, `num_batches_tracked`, OpenAI's
`input_resolution` / `context_length` / `vocab_size` ints) are ignored. Any other key that no
rule reads, any key a rule needs that is missing, and any tensor whose shape disagrees with the
config raise `ValueError` naming the key.

Example:
  >>> import numpy as np
  >>> from mmts_jax.models.clip.config import CLIPConfig
  >>> cfg = CLIPConfig(embed_dim=4, image_size=32, vision_width=64, vision_layers=(1,),
  ...                  vision_heads=1, patch_size=16, context_length=5, vocab_size=10,
  ...                  text_width=64, text_heads=1, text_layers=1)
  >>> rules = param_rules(cfg, "openclip")
  >>> sorted({k for r in rules for k in r.sources})[:2]
  ['ln_final.bias', 'ln_final.weight']
  >>> [r.sources for r in rules if r.path == ("visual", "proj")]
  [('visual.proj',)]
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mmts_jax.models.clip.config import CLIPConfig
from mmts_jax.models.clip.model import CLIP

__all__ = [
  "FORMATS",
  "Rule",
  "detect_format",
  "infer_config",
  "param_rules",
  "convert_state_dict",
  "expected_shapes",
]

FORMATS = ("openclip", "hf")
BN_EPS = 1e-5
_IGNORED = re.compile(
  r"(^|\.)(position_ids|attn_mask|num_batches_tracked)$"
  r"|^(input_resolution|context_length|vocab_size)$"
)
_PREFIXES = ("module.", "_orig_mod.")


@dataclasses.dataclass(frozen=True)
class Rule:
  """`params[path] = fn(*[state_dict[k] for k in sources])`."""

  path: tuple[str, ...]
  sources: tuple[str, ...]
  fn: Callable[..., np.ndarray]


def _identity(x):
  return x


def _linear(x):
  if x.ndim != 2:
    raise ValueError(f"expected a 2-D Linear weight, got shape {x.shape}")
  return x.T


def _conv(x):
  if x.ndim != 4:
    raise ValueError(f"expected a 4-D Conv weight, got shape {x.shape}")
  return x.transpose(2, 3, 1, 0)


def _chunk(i: int, transpose: bool):
  def fn(x):
    if x.shape[0] % 3:
      raise ValueError(f"fused q/k/v leading dimension {x.shape[0]} is not a multiple of 3")
    part = np.split(x, 3, axis=0)[i]
    return part.T if transpose else part

  return fn


def _fold_bn(gamma, beta, mean, var):
  scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)
  return scale, beta.astype(np.float64) - mean.astype(np.float64) * scale


def _bn_rules(path, prefix):
  src = tuple(f"{prefix}.{n}" for n in ("weight", "bias", "running_mean", "running_var"))
  return [
    Rule(path + ("scale",), src, lambda *a: _fold_bn(*a)[0]),
    Rule(path + ("bias",), src, lambda *a: _fold_bn(*a)[1]),
  ]


def _dense_rules(path, prefix):
  return [
    Rule(path + ("kernel",), (f"{prefix}.weight",), _linear),
    Rule(path + ("bias",), (f"{prefix}.bias",), _identity),
  ]


def _ln_rules(path, prefix):
  return [
    Rule(path + ("scale",), (f"{prefix}.weight",), _identity),
    Rule(path + ("bias",), (f"{prefix}.bias",), _identity),
  ]


def _block_rules(path, prefix, fmt):
  """One residual block: `path` in Flax, `prefix` in the state dict (ends without a dot)."""
  rules = []
  if fmt == "openclip":
    names = {
      "ln_1": "ln_1",
      "ln_2": "ln_2",
      "c_fc": "mlp.c_fc",
      "c_proj": "mlp.c_proj",
      "out_proj": "attn.out_proj",
    }
    for i, qkv in enumerate(("q_proj", "k_proj", "v_proj")):
      rules.append(
        Rule(path + ("attn", qkv, "kernel"), (f"{prefix}.attn.in_proj_weight",), _chunk(i, True))
      )
      rules.append(
        Rule(path + ("attn", qkv, "bias"), (f"{prefix}.attn.in_proj_bias",), _chunk(i, False))
      )
  else:
    names = {
      "ln_1": "layer_norm1",
      "ln_2": "layer_norm2",
      "c_fc": "mlp.fc1",
      "c_proj": "mlp.fc2",
      "out_proj": "self_attn.out_proj",
    }
    for qkv in ("q_proj", "k_proj", "v_proj"):
      rules += _dense_rules(path + ("attn", qkv), f"{prefix}.self_attn.{qkv}")
  rules += _ln_rules(path + ("ln_1",), f"{prefix}.{names['ln_1']}")
  rules += _ln_rules(path + ("ln_2",), f"{prefix}.{names['ln_2']}")
  rules += _dense_rules(path + ("attn", "out_proj"), f"{prefix}.{names['out_proj']}")
  rules += _dense_rules(path + ("c_fc",), f"{prefix}.{names['c_fc']}")
  rules += _dense_rules(path + ("c_proj",), f"{prefix}.{names['c_proj']}")
  return rules


def _resnet_rules(cfg: CLIPConfig):
  v = ("visual",)
  rules = []
  for i in (1, 2, 3):
    rules.append(Rule(v + (f"conv{i}", "kernel"), (f"visual.conv{i}.weight",), _conv))
    rules += _bn_rules(v + (f"bn{i}",), f"visual.bn{i}")
  for stage, blocks in enumerate(cfg.vision_layers):
    for j in range(blocks):
      path, prefix = v + (f"layer{stage + 1}_{j}",), f"visual.layer{stage + 1}.{j}"
      for i in (1, 2, 3):
        rules.append(Rule(path + (f"conv{i}", "kernel"), (f"{prefix}.conv{i}.weight",), _conv))
        rules += _bn_rules(path + (f"bn{i}",), f"{prefix}.bn{i}")
      if j == 0:  # the first block of every stage changes the width or the stride
        rules.append(
          Rule(path + ("downsample_conv", "kernel"), (f"{prefix}.downsample.0.weight",), _conv)
        )
        rules += _bn_rules(path + ("downsample_bn",), f"{prefix}.downsample.1")
  pool = v + ("attnpool",)
  rules.append(
    Rule(pool + ("positional_embedding",), ("visual.attnpool.positional_embedding",), _identity)
  )
  for name in ("q_proj", "k_proj", "v_proj", "c_proj"):
    rules += _dense_rules(pool + ("attn", name), f"visual.attnpool.{name}")
  return rules


def _vit_rules(cfg: CLIPConfig, fmt: str):
  v = ("visual",)
  t = v + ("transformer",)
  if fmt == "openclip":
    rules = [
      Rule(v + ("conv1", "kernel"), ("visual.conv1.weight",), _conv),
      Rule(v + ("class_embedding",), ("visual.class_embedding",), _identity),
      Rule(v + ("positional_embedding",), ("visual.positional_embedding",), _identity),
      Rule(v + ("proj",), ("visual.proj",), _identity),
    ]
    rules += _ln_rules(v + ("ln_pre",), "visual.ln_pre") + _ln_rules(
      v + ("ln_post",), "visual.ln_post"
    )
    block = "visual.transformer.resblocks.{}"
  else:
    e = "vision_model.embeddings"
    rules = [
      Rule(v + ("conv1", "kernel"), (f"{e}.patch_embedding.weight",), _conv),
      Rule(v + ("class_embedding",), (f"{e}.class_embedding",), _identity),
      Rule(v + ("positional_embedding",), (f"{e}.position_embedding.weight",), _identity),
      Rule(v + ("proj",), ("visual_projection.weight",), _linear),
    ]
    rules += _ln_rules(v + ("ln_pre",), "vision_model.pre_layrnorm") + _ln_rules(
      v + ("ln_post",), "vision_model.post_layernorm"
    )
    block = "vision_model.encoder.layers.{}"
  for i in range(cfg.vision_layers[0]):
    rules += _block_rules(t + (f"resblocks_{i}",), block.format(i), fmt)
  return rules


def _text_rules(cfg: CLIPConfig, fmt: str):
  x = ("text",)
  if fmt == "openclip":
    rules = [
      Rule(x + ("token_embedding", "embedding"), ("token_embedding.weight",), _identity),
      Rule(x + ("positional_embedding",), ("positional_embedding",), _identity),
      Rule(x + ("text_projection",), ("text_projection",), _identity),
    ]
    rules += _ln_rules(x + ("ln_final",), "ln_final")
    block = "transformer.resblocks.{}"
  else:
    e = "text_model.embeddings"
    rules = [
      Rule(x + ("token_embedding", "embedding"), (f"{e}.token_embedding.weight",), _identity),
      Rule(x + ("positional_embedding",), (f"{e}.position_embedding.weight",), _identity),
      Rule(x + ("text_projection",), ("text_projection.weight",), _linear),
    ]
    rules += _ln_rules(x + ("ln_final",), "text_model.final_layer_norm")
    block = "text_model.encoder.layers.{}"
  for i in range(cfg.text_layers):
    rules += _block_rules(x + ("transformer", f"resblocks_{i}"), block.format(i), fmt)
  return rules


def param_rules(cfg: CLIPConfig, fmt: str) -> list[Rule]:
  """Every rule that builds the Flax tree of `CLIP(cfg)` from a `fmt` state dict."""
  if fmt not in FORMATS:
    raise ValueError(f"state-dict format must be one of {FORMATS}, got {fmt!r}")
  if cfg.vision_kind == "resnet":
    if fmt == "hf":
      raise ValueError(
        "Hugging Face CLIPModel has no ResNet image tower; a ResNet checkpoint "
        "must be in OpenAI / OpenCLIP naming (format 'openclip')"
      )
    rules = _resnet_rules(cfg)
  else:
    rules = _vit_rules(cfg, fmt)
  return rules + _text_rules(cfg, fmt) + [Rule(("logit_scale",), ("logit_scale",), _identity)]


def strip_prefixes(sd: Mapping[str, Any]) -> dict[str, Any]:
  """Drops the `module.` (DDP) and `_orig_mod.` (torch.compile) prefixes training scripts add."""
  out = {}
  for k, v in sd.items():
    for p in _PREFIXES:
      while k.startswith(p):
        k = k[len(p) :]
    out[k] = v
  return out


def detect_format(sd: Mapping[str, Any]) -> str:
  """ "hf" for `vision_model.` / `text_model.` keys, "openclip" for `visual.` /
  `token_embedding.` keys."""
  keys = list(sd)
  if any(k.startswith(("vision_model.", "text_model.")) for k in keys):
    return "hf"
  if any(k.startswith(("visual.", "token_embedding.")) for k in keys):
    return "openclip"
  raise ValueError(
    "cannot tell the checkpoint's naming: no 'visual.' / 'token_embedding.' "
    "(OpenAI / OpenCLIP) or 'vision_model.' / 'text_model.' (Hugging Face) keys; "
    f"first keys: {keys[:5]}"
  )


def _count(sd, pattern: str) -> int:
  rx = re.compile(pattern)
  return len({m.group(1) for k in sd if (m := rx.match(k))})


def _shape(sd, key):
  if key not in sd:
    raise ValueError(f"state dict has no {key!r}, needed to infer the model's shape")
  return tuple(np.shape(sd[key]))


def infer_config(
  sd: Mapping[str, Any],
  fmt: str,
  *,
  act: str | None = None,
  hf_config: Mapping[str, Any] | None = None,
  **overrides,
) -> CLIPConfig:
  """The `CLIPConfig` a state dict's shapes imply.

  Heads are not visible in the shapes: they follow OpenAI's rule `width / 64` (ViT and text) and
  `32 * width / 64` (ResNet attention pool) unless a Hugging Face `config.json` (`hf_config`) or
  `overrides` say otherwise. `act` defaults to the HF config's `hidden_act`, else "quick_gelu"
  (OpenAI's weights; OpenCLIP's LAION weights need "gelu").
  """
  vision: dict[str, Any]  # CLIPConfig's keyword arguments, of several types
  text: dict[str, Any]
  if fmt == "openclip":
    if "visual.layer1.0.conv1.weight" in sd:
      stages = tuple(_count(sd, rf"visual\.layer{s}\.(\d+)\.") for s in (1, 2, 3, 4))
      width = _shape(sd, "visual.layer1.0.conv1.weight")[0]
      grid = round((_shape(sd, "visual.attnpool.positional_embedding")[0] - 1) ** 0.5)
      vision = dict(
        vision_kind="resnet",
        vision_width=width,
        vision_layers=stages,
        vision_heads=width * 32 // 64,
        image_size=grid * 32,
        patch_size=0,
      )
    else:
      width, _, patch, _ = _shape(sd, "visual.conv1.weight")
      grid = round((_shape(sd, "visual.positional_embedding")[0] - 1) ** 0.5)
      vision = dict(
        vision_kind="vit",
        vision_width=width,
        patch_size=patch,
        image_size=grid * patch,
        vision_heads=width // 64,
        vision_layers=(_count(sd, r"visual\.transformer\.resblocks\.(\d+)\."),),
      )
    text_width = _shape(sd, "ln_final.weight")[0]
    text = dict(
      context_length=_shape(sd, "positional_embedding")[0],
      vocab_size=_shape(sd, "token_embedding.weight")[0],
      text_width=text_width,
      text_heads=text_width // 64,
      text_layers=_count(sd, r"transformer\.resblocks\.(\d+)\."),
    )
    embed_dim = _shape(sd, "text_projection")[1]
  elif fmt == "hf":
    width, _, patch, _ = _shape(sd, "vision_model.embeddings.patch_embedding.weight")
    grid = round((_shape(sd, "vision_model.embeddings.position_embedding.weight")[0] - 1) ** 0.5)
    vision = dict(
      vision_kind="vit",
      vision_width=width,
      patch_size=patch,
      image_size=grid * patch,
      vision_heads=width // 64,
      vision_layers=(_count(sd, r"vision_model\.encoder\.layers\.(\d+)\."),),
    )
    text_width = _shape(sd, "text_model.final_layer_norm.weight")[0]
    ctx, _ = _shape(sd, "text_model.embeddings.position_embedding.weight")
    text = dict(
      context_length=ctx,
      text_width=text_width,
      text_heads=text_width // 64,
      vocab_size=_shape(sd, "text_model.embeddings.token_embedding.weight")[0],
      text_layers=_count(sd, r"text_model\.encoder\.layers\.(\d+)\."),
    )
    embed_dim = _shape(sd, "text_projection.weight")[0]
    if hf_config:
      vc, tc = hf_config.get("vision_config") or {}, hf_config.get("text_config") or {}
      if "num_attention_heads" in vc:
        vision["vision_heads"] = int(vc["num_attention_heads"])
      if "num_attention_heads" in tc:
        text["text_heads"] = int(tc["num_attention_heads"])
      eps = {e for e in (vc.get("layer_norm_eps"), tc.get("layer_norm_eps")) if e is not None}
      if len(eps) == 1:
        overrides.setdefault("ln_eps", float(eps.pop()))
      acts = {a for a in (vc.get("hidden_act"), tc.get("hidden_act")) if a is not None}
      if act is None and acts:
        if len(acts) > 1:
          raise ValueError(f"HF config: the towers use different activations {sorted(acts)}")
        act = acts.pop()
  else:
    raise ValueError(f"state-dict format must be one of {FORMATS}, got {fmt!r}")
  return CLIPConfig(embed_dim=embed_dim, act=act or "quick_gelu", **{**vision, **text, **overrides})


def expected_shapes(cfg: CLIPConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
  """Flax path -> shape of every parameter of `CLIP(cfg)` (traced abstractly, no FLOPs)."""
  model = CLIP(cfg)
  batch = {
    "image": jax.ShapeDtypeStruct((1, cfg.image_size, cfg.image_size, 3), jnp.float32),
    "text": jax.ShapeDtypeStruct((1, cfg.context_length), jnp.int32),
  }
  tree = jax.eval_shape(lambda b: model.init(jax.random.PRNGKey(0), b), batch)["params"]
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {tuple(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def _listing(keys, limit=8) -> str:
  keys = sorted(keys)
  more = f" ... and {len(keys) - limit} more" if len(keys) > limit else ""
  return ", ".join(repr(k) for k in keys[:limit]) + more


def convert_state_dict(sd: Mapping[str, Any], cfg: CLIPConfig, fmt: str) -> dict[str, Any]:
  """A state dict (name -> array) -> the nested float32 numpy `params` of `CLIP(cfg)`.

  Raises:
    ValueError: keys missing or unexpected, or a tensor of the wrong shape (named).
  """
  sd = strip_prefixes(sd)
  rules = param_rules(cfg, fmt)
  needed = {k for r in rules for k in r.sources}
  missing = needed - set(sd)
  unexpected = {k for k in sd if k not in needed and not _IGNORED.search(k)}
  if missing or unexpected:
    parts = []
    if missing:
      parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
    if unexpected:
      parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
    raise ValueError(
      f"CLIP state dict ({fmt} naming) does not match the config "
      f"({cfg.vision_kind}, {cfg.vision_layers} image layers, {cfg.text_layers} "
      f"text layers): " + "; ".join(parts)
    )
  shapes = expected_shapes(cfg)
  built = {r.path for r in rules}
  if built != set(shapes):  # a bug in the rules, not in the checkpoint
    raise RuntimeError(
      f"CLIP converter rules out of sync with the model: {_listing(built ^ set(shapes))}"
    )
  params: dict[str, Any] = {}
  for rule in rules:
    arrays = [np.asarray(sd[k], dtype=np.float32) for k in rule.sources]
    want = shapes[rule.path]
    try:
      value = np.asarray(rule.fn(*arrays), dtype=np.float32)
    except ValueError as e:
      raise ValueError(
        f"CLIP state dict: {rule.sources[0]!r} has shape {arrays[0].shape}, "
        f"which cannot give {'/'.join(rule.path)} of shape {want}: {e}"
      ) from None
    if value.shape != want:
      raise ValueError(
        f"CLIP state dict: {rule.sources[0]!r} has shape {arrays[0].shape}, "
        f"which gives {'/'.join(rule.path)} of shape {value.shape}; the config "
        f"needs {want}"
      )
    node = params
    for name in rule.path[:-1]:
      node = node.setdefault(name, {})
    node[rule.path[-1]] = value
  return params
