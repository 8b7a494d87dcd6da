import numpy as np

from mmts_jax.atomic_io import atomic_write
from mmts_jax.eval.zero_shot import RetrievalTestSet
from mmts_jax.projects.ek100_features.embedding import embed_array
from mmts_jax.projects.ek100_features.restore import load_trained_model
from mmts_jax.train import make_embed_fn

run, test = "gs://my-bucket/runs/mini", "gs://my-bucket/data/mini_test"
out = "gs://my-bucket/eval/mini_test_emb.npz"
trained = load_trained_model(run)  # config.json + latest checkpoint
d = trained.config.data
ts = RetrievalTestSet.from_records(test, d.tokenizer, image_size=d.image_size, text_len=d.text_len)
embed, m = make_embed_fn(trained.model), trained.model
img = embed_array(embed, trained.variables, m.image_key, ts.images, "image")
txt = embed_array(embed, trained.variables, m.text_key, ts.texts, "text")
atomic_write(
  out, lambda f: np.savez(f, image_emb=img, text_emb=txt, text_to_image=ts.text_to_image)
)
print(f"step {trained.step}: {len(img)} images, {len(txt)} captions -> {out}")
