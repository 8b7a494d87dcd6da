"""The synthetic long-tail dataset as a trainer input source (`config.data.name` =
`"synthetic_longtail"`, registered in `mmts_jax.data.sources.SOURCES`).

The trainer calls `make_source(config.data, global_batch_size=B, seed=S)`; the `config.data`
fields other than `name`/`shuffle` are `GeneratorConfig` fields. The source yields the training
split (`image_features`, `text` token ids, `index`), carries the dataset fingerprint (the
captions in index order, the cluster table's scheme), so a table built for another dataset is
refused, and the class sizes as default cluster sizes (`mmts train` without a K-Means table).

Example:
  >>> import ml_collections
  >>> cfg = ml_collections.ConfigDict(dict(num_classes=4, head_size=40, imbalance=10))
  >>> src = make_source(cfg, global_batch_size=8, seed=0)
  >>> sorted(next(src.iterate()))
  ['image_features', 'index', 'text']
"""

from __future__ import annotations

import dataclasses

from mmts_jax.longtail import generator

__all__ = ["make_source", "generator_config"]

_FIELDS = {f.name for f in dataclasses.fields(generator.GeneratorConfig)}


def generator_config(cfg) -> generator.GeneratorConfig:
  """The `GeneratorConfig` fields of a `config.data` section (other keys are ignored)."""
  items = cfg.items() if hasattr(cfg, "items") else vars(cfg).items()
  return generator.GeneratorConfig(**{k: v for k, v in items if k in _FIELDS})


def make_source(cfg, *, global_batch_size: int, seed: int):
  """The training split of the synthetic dataset as the trainer's `ArraySource`.

  `seed` (the run's seed) orders the batches; the data itself depends only on `cfg.seed`, so
  every ablation row and seed trains on the same dataset.
  """
  from mmts_jax.clusters.table import dataset_fingerprint
  from mmts_jax.data.sources import ArraySource

  ds = generator.make_dataset(generator_config(cfg))
  arrays = {"image_features": ds.train.image, "text": ds.train.tokens, "index": ds.train.index}
  return ArraySource(
    arrays,
    global_batch_size=global_batch_size,
    seed=seed,
    shuffle=bool(cfg.get("shuffle", True)),
    cluster_sizes=ds.class_sizes[ds.train.label],
    fingerprint=dataset_fingerprint(ds.train.captions),
  )
