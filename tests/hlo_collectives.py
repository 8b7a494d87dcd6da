"""The collectives in compiled HLO text, for the tests that check a sharded program moves only
what it should (the Pallas kernels' partitioning rules)."""

from __future__ import annotations

import re

_PATTERN = r"= (\(?[^=]*?\)?) (all-gather|all-to-all|collective-permute|reduce-scatter|all-reduce)"


def collectives(compiled_text: str) -> dict[str, list[str]]:
  """{op: [result shapes]} of the collectives in compiled HLO text (async forms included)."""
  found: dict[str, list[str]] = {}
  for line in compiled_text.splitlines():
    m = re.search(_PATTERN + r"(?:-start)?\(", line)
    if m:
      found.setdefault(m.group(2), []).extend(re.findall(r"\w+\[[\d,]*\]", m.group(1)))
  return found
