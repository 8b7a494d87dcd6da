"""The synthetic long-tail benchmark (`mmts synthetic`, README command one), one row at a time.

  mmts train --config configs/synthetic.py:ROW --workdir DIR    # ROW: fixed | clip | ts | ics |
                                                                # mmts (default)

The configuration lives in `mmts_jax/longtail/config.py` (the rows, the MM-TS values
alpha=0.04, sh=[0.05, 0.10], and why); `mmts synthetic` trains all rows with a K-Means cluster
table and evaluates them.
"""

from mmts_jax.longtail.config import BENCHMARK_ROWS, ROW_LABELS, get_config

__all__ = ["get_config", "BENCHMARK_ROWS", "ROW_LABELS"]
