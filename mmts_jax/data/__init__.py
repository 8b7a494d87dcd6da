"""Input data for mmts_jax: ArrayRecord datasets, conversion, grain pipelines, features.

Submodules are imported on use (`from mmts_jax.data import pipeline`), so reading data never
imports TFDS or transformers, and nothing here imports TensorFlow.

  sources      the trainer's input protocol, the registry of sources (`config.data.name`) and the
               one host-to-device path (`to_device`, `prefetch_to_device`)
  fingerprint  `dataset_fingerprint(captions)`: the sha256 a cluster table is checked against
  records      ArrayRecord writer/reader (`RecordWriter`, `RecordSource`) and the manifest
  convert      CSV/TSV + images, webdataset tars, TFDS by name -> records
  image_ops    decode, random resized crop, resize + centre crop, CLIP normalisation
  tokenize     `TextTokenizer`: fixed-length int32 ids from a tokenizer directory
  pipeline     grain pipelines: seeded shuffling, per-host sharding, resumable loader, prefetch
  features     precomputed embeddings (npz) + index, for feature-level fine-tuning
  tfds_source  a TFDS split read in place (`TfdsSource`), no conversion, no TensorFlow
  trainer_source  the `records`, `features` and `tfds` sources of `mmts train`
  synthetic    small real JPEG/PNG folders and webdataset tars, for tests and trying things
"""
