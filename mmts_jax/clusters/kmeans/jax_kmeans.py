"""K-Means in JAX on the accelerator: greedy k-means++ init and Lloyd iterations, data sharded
over the local devices along the sample axis.

Maths (the same as scikit-learn's Lloyd K-Means):
  assignment  l_i = argmin_c ||x_i - c||^2 = argmin_c (||c||^2 - 2 <x_i, c>)   (one GEMM)
  update      c   = sum_{l_i = c} x_i / |{i : l_i = c}|   (an empty cluster keeps its centre)
  stop        sum_c ||c_new - c_old||^2 <= tol * mean_d Var(x_d), or no label changed
  init        greedy k-means++ (Arthur & Vassilvitskii 2007): each new centre is the best of
              `2 + ln k` candidates drawn with probability proportional to D(x)^2.

Memory: the `(N, k)` distance matrix and the data, `N (D + k)` floats, split over the devices
(3.3 M x 384 with k=200: 7.7 GB). Padded rows carry weight 0, so N need not divide the number
of devices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mmts_jax.clusters.kmeans.checks import check_k, check_points
from mmts_jax.clusters.kmeans.result import KMeansResult

__all__ = ["kmeans_jax"]

_PRECISIONS = {
  "highest": jax.lax.Precision.HIGHEST,
  "high": jax.lax.Precision.HIGH,
  "default": jax.lax.Precision.DEFAULT,
}


def _sq_dist(x, x2, c, precision):
  """`(N, M)` squared distances, clipped at 0 against round-off."""
  xc = jnp.dot(x, c.T, precision=precision)
  return jnp.maximum(x2[:, None] - 2.0 * xc + jnp.sum(c * c, axis=1)[None, :], 0.0)


def _draw(key, mass, num: int, n_real):
  """`num` indices drawn with probability proportional to `mass`, by inverse CDF.

  The cumulative sum ignores the zero-mass padding rows at the end, so the draw does not depend
  on how many devices the rows were padded for (a seed gives the same init on 1 or 8 devices).
  """
  cdf = jnp.cumsum(mass)
  u = jax.random.uniform(key, (num,), mass.dtype) * cdf[-1]
  return jnp.minimum(jnp.searchsorted(cdf, u, side="right"), n_real - 1)


@functools.partial(jax.jit, static_argnames=("k", "n_trials", "precision"))
def _kmeans_plus_plus(key, x, x2, w, k: int, n_trials: int, precision):
  n, d = x.shape
  n_real = jnp.sum(w > 0)  # real rows come first, weight-0 padding after
  key, sub = jax.random.split(key)
  first = jax.random.randint(sub, (), 0, n_real)
  closest = _sq_dist(x, x2, x[first][None], precision)[:, 0]
  centers = jnp.zeros((k, d), x.dtype).at[0].set(x[first])

  def body(i, carry):
    centers, closest, key = carry
    key, sub = jax.random.split(key)
    cand = _draw(sub, w * closest, n_trials, n_real)
    cx = x[cand]
    new = jnp.minimum(closest[:, None], _sq_dist(x, x2, cx, precision))  # (N, trials)
    best = jnp.argmin(jnp.sum(w[:, None] * new, axis=0))  # the candidate that lowers D^2 most
    return centers.at[i].set(cx[best]), new[:, best], key

  centers, _, _ = jax.lax.fori_loop(1, k, body, (centers, closest, key))
  return centers


@functools.partial(jax.jit, static_argnames=("k", "update", "precision"))
def _lloyd_step(x, x2, w, centers, prev_labels, k: int, update: str, precision):
  labels = jnp.argmin(_sq_dist(x, x2, centers, precision), axis=1).astype(jnp.int32)
  if update == "matmul":
    # One-hot GEMM: dense and all-reduce friendly on GPU/TPU (no scatter atomics).
    onehot = jax.nn.one_hot(labels, k, dtype=x.dtype) * w[:, None]
    sums = jnp.dot(onehot.T, x, precision=precision)
    counts = jnp.sum(onehot, axis=0)
  else:
    sums = jax.ops.segment_sum(x * w[:, None], labels, num_segments=k)
    counts = jax.ops.segment_sum(w, labels, num_segments=k)
  new = jnp.where(counts[:, None] > 0, sums / jnp.maximum(counts, 1.0)[:, None], centers)
  shift = jnp.sum((new - centers) ** 2)
  changed = jnp.sum((labels != prev_labels) & (w > 0))
  return new, labels, shift, changed


@functools.partial(jax.jit, static_argnames=("precision",))
def _finish(x, x2, w, centers, precision):
  """Final assignment and the exact inertia `sum_i w_i ||x_i - c_{l_i}||^2` (no expansion)."""
  labels = jnp.argmin(_sq_dist(x, x2, centers, precision), axis=1).astype(jnp.int32)
  diff = x - centers[labels]
  return labels, jnp.sum(w * jnp.sum(diff * diff, axis=1))


@jax.jit
def _tolerance_scale(x, w):
  """mean over features of the weighted variance: scikit-learn's scale for `tol`."""
  mean = jnp.sum(w[:, None] * x, axis=0) / jnp.sum(w)
  return jnp.sum(w[:, None] * (x - mean) ** 2) / (jnp.sum(w) * x.shape[1])


def kmeans_jax(
  x,
  k: int = 200,
  *,
  seed: int = 0,
  n_init: int = 1,
  max_iter: int = 300,
  tol: float = 1e-4,
  n_trials: int | None = None,
  update: str = "auto",
  precision: str = "highest",
  devices=None,
  progress: bool | None = False,
) -> KMeansResult:
  """Lloyd K-Means on the local devices; the run with the lowest inertia over `n_init` inits.

  Args:
    x: `(N, D)` points (numpy or jax), finite.
    k: number of clusters, `1 <= k <= N`.
    seed: PRNG seed of the k-means++ draws; init r uses `fold_in(PRNGKey(seed), r)`.
    max_iter, tol: as scikit-learn (`tol` is relative to the mean feature variance).
    n_trials: candidates per greedy k-means++ step (default `2 + floor(ln k)`, as scikit-learn).
    update: "matmul" (one-hot GEMM, default on GPU/TPU), "scatter" (segment_sum, default on
      CPU) or "auto".
    precision: "highest" (float32 GEMMs) or "high"/"default" (TF32/bf16 passes: faster).
    devices: devices to shard the samples over (default `jax.local_devices()`).
    progress: a tqdm bar over Lloyd iterations (None: only when stderr is a terminal).

  Example:
    >>> x = np.random.default_rng(0).normal(size=(200, 4)).astype(np.float32)
    >>> r = kmeans_jax(x, 3, seed=0)
    >>> r.labels.shape, r.centers.shape
    ((200,), (3, 4))
  """
  x = check_points(x)
  n, d = x.shape
  k = check_k(k, n)
  if n_init < 1 or max_iter < 1:
    raise ValueError(f"n_init and max_iter must be >= 1, got n_init={n_init}, max_iter={max_iter}")
  if not (tol >= 0 and math.isfinite(tol)):
    raise ValueError(f"tol must be finite and >= 0, got {tol}")
  if precision not in _PRECISIONS:
    raise ValueError(f"precision={precision!r} is not one of {sorted(_PRECISIONS)}")
  devices = list(devices) if devices is not None else jax.local_devices()
  if update == "auto":
    update = "scatter" if devices[0].platform == "cpu" else "matmul"
  if update not in ("matmul", "scatter"):
    raise ValueError(f"update={update!r} is not one of 'auto', 'matmul', 'scatter'")
  n_trials = n_trials or 2 + int(math.log(k))
  prec = _PRECISIONS[precision]

  mesh = Mesh(np.array(devices), ("data",))
  rows, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
  padded = -(-n // len(devices)) * len(devices)
  xp = np.zeros((padded, d), np.float32)
  xp[:n] = x
  wp = np.zeros((padded,), np.float32)
  wp[:n] = 1.0
  xd, wd = jax.device_put((xp, wp), rows)
  x2 = jax.jit(lambda a: jnp.sum(a * a, axis=1))(xd)
  tol_abs = float(_tolerance_scale(xd, wd)) * tol

  best = None
  for r in range(n_init):
    key = jax.random.fold_in(jax.random.PRNGKey(seed), r)
    centers = jax.device_put(_kmeans_plus_plus(key, xd, x2, wd, k, n_trials, prec), replicated)
    labels = jax.device_put(np.full((padded,), -1, np.int32), rows)
    iters = range(1, max_iter + 1)
    bar = None
    if progress is not False:  # None: a bar only when stderr is a terminal (tqdm's rule)
      from tqdm.auto import tqdm

      iters = bar = tqdm(
        iters,
        desc=f"k-means (jax, k={k}, init {r + 1}/{n_init})",
        unit="it",
        disable=None if progress is None else False,
      )
    n_iter = max_iter
    for it in iters:
      centers, labels, shift, changed = _lloyd_step(xd, x2, wd, centers, labels, k, update, prec)
      shift, changed = float(shift), int(changed)
      if bar is not None:
        bar.set_postfix(shift=f"{shift:.3g}", changed=changed)
      if changed == 0 or shift <= tol_abs:
        n_iter = it
        break
    if bar is not None:
      bar.close()
    final_labels, inertia = _finish(xd, x2, wd, centers, prec)
    inertia = float(inertia)
    if best is None or inertia < best[0]:
      best = (inertia, final_labels, centers, n_iter)
  assert best is not None, "n_init >= 1 was checked, so one run was kept"
  inertia, labels, centers, n_iter = best
  return KMeansResult(
    labels=np.asarray(labels)[:n],
    centers=np.asarray(centers, np.float32),
    inertia=inertia,
    n_iter=n_iter,
    backend="jax",
    seed=seed,
  )
