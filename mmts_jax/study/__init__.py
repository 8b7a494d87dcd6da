"""The paired, seed-batched study of temperature policies on the synthetic long-tail task.

`task` (data as arrays), `policies` (the rows, on the `Policy` interface), `runner` (all seeds of
one trial as one program), `experiment` (grid, evaluation, selection), `stats` (paired
intervals), `report` (docs/study.md). `python -m mmts_jax.study --out DIR` runs it all.
"""
