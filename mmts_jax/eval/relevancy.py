"""EK-100 MIR relevancy: `0.5 * [verb classes equal] + 0.5 * IoU(noun class sets)`.

The relevancy of a (video, caption) pair compares the classes of the video segment with the
classes of the caption. The validation ("test") split has two files:

* `EPIC_100_retrieval_test.csv`: the 9,668 video segments, with `verb_class` and
  `all_noun_classes` (a list, e.g. `[2, 10]`);
* `EPIC_100_retrieval_test_sentence.csv`: the 3,842 captions, each with the `narration_id` of a
  video segment. A caption's classes are those of that segment.

Going by the `narration_id` (not by matching the caption text) is what reproduces the official
relevancy: 14 narrations (e.g. "stir") occur with several class sets, so the text alone is
ambiguous; 7 extra rows at the end of the sentence file repeat some of them with a segment of
another class set, so that every video's class set is carried by some caption (every video has
a caption of relevancy 1). In those last rows the text column is shifted by one row against the
ids; the ids are consistent with the classes, the text is not. `tests/test_eval_mir.py` checks
the result against the official relevancy slice in `shared/reference/ek100_mir_small.npz`.
"""

from __future__ import annotations

import ast
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from mmts_jax import read_access
from mmts_jax.errors import MissingFileError, UserInputError
from mmts_jax.table_files import Table, read_table

__all__ = [
  "video_subset",
  "Ek100MirAnnotations",
  "read_ek100_mir",
  "class_relevancy",
  "ek100_relevancy",
  "read_csv_rows",
  "parse_class_list",
]

VIDEO_CSV = "EPIC_100_retrieval_test.csv"
SENTENCE_CSV = "EPIC_100_retrieval_test_sentence.csv"


@dataclasses.dataclass(frozen=True)
class Ek100MirAnnotations:
  """Videos (rows of the similarity matrix) and captions (columns), with their classes."""

  video_ids: tuple[str, ...]
  video_verbs: np.ndarray  # (V,) int
  video_nouns: tuple[tuple[int, ...], ...]
  caption_ids: tuple[str, ...]  # the segment whose classes the caption takes
  captions: tuple[str, ...]
  caption_verbs: np.ndarray  # (C,) int
  caption_nouns: tuple[tuple[int, ...], ...]

  @property
  def shape(self) -> tuple[int, int]:
    """(videos, captions): the shape of the similarity and relevancy matrices."""
    return len(self.video_ids), len(self.caption_ids)


def read_csv_rows(path: str, required: Sequence[str]) -> list[dict[str, str]]:
  """Rows of a CSV as dicts; `UserInputError` names the file, line and problem of a bad one."""
  return read_table(path, required, kind="csv").rows


def _int_cell(table: Table, i: int, column: str) -> int:
  text = table.rows[i][column].strip()
  try:
    return int(text)
  except ValueError:
    raise UserInputError(
      table.path,
      f"{column} is {text!r}",
      line=table.lines[i],
      key=column,
      expected="an integer class id",
    ) from None


def parse_class_list(
  text: str, where: str, column: str = "all_noun_classes", *, non_empty: bool = False
) -> tuple[int, ...]:
  """A CSV cell like `[3, 12]` as a tuple of ints; `non_empty` also wants >= 1 entry, all >= 0."""
  try:
    value = ast.literal_eval(text)
  except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
    raise UserInputError(
      None, f"{where}: {column} is {text!r}", expected="a list of ints like [3, 12]"
    ) from e
  ok = isinstance(value, (list, tuple)) and all(isinstance(v, int) for v in value)
  if non_empty:
    ok = ok and bool(value) and all(v >= 0 for v in value)
  if not ok:
    kind = "a non-empty list of ints >= 0" if non_empty else "a list of ints"
    raise UserInputError(None, f"{where}: {column} is {text!r}", expected=kind)
  return tuple(value)


def read_ek100_mir(
  directory: str | os.PathLike | None = None,
  *,
  video_csv: str | os.PathLike | None = None,
  sentence_csv: str | os.PathLike | None = None,
) -> Ek100MirAnnotations:
  """Reads the EK-100 MIR validation annotations (videos, captions and their classes).

  Args:
    directory: folder holding `EPIC_100_retrieval_test.csv` and
      `EPIC_100_retrieval_test_sentence.csv`; or give both paths explicitly.

  Raises:
    ValueError: a missing column, a malformed class list, or a caption whose `narration_id`
      is not a video segment.

  Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()  # three segments, two captions (real files: ../shared/data/ek100)
    >>> with open(os.path.join(d, "EPIC_100_retrieval_test.csv"), "w") as f:
    ...   _ = f.write("narration_id,verb_class,all_noun_classes\\n"
    ...               'a,0,[2]\\nb,1,[2]\\nc,0,"[2, 5]"\\n')
    >>> with open(os.path.join(d, "EPIC_100_retrieval_test_sentence.csv"), "w") as f:
    ...   _ = f.write("narration_id,narration\\na,take plate\\nc,take plate and fork\\n")
    >>> ann = read_ek100_mir(d)
    >>> ann.shape, ann.caption_nouns
    ((3, 2), ((2,), (2, 5)))
  """
  if directory is not None:
    video_csv = video_csv or os.path.join(directory, VIDEO_CSV)
    sentence_csv = sentence_csv or os.path.join(directory, SENTENCE_CSV)
  if video_csv is None or sentence_csv is None:
    raise ValueError("read_ek100_mir: give a directory, or both video_csv and sentence_csv")
  if directory is not None and not read_access.is_dir(directory):
    there = read_access.exists(directory)
    raise (UserInputError if there else MissingFileError)(
      os.fspath(directory),
      "is not a folder" if there else "no such folder",
      expected=f"the EK-100 annotation folder with {VIDEO_CSV} and {SENTENCE_CSV}",
    )
  vt = read_table(
    os.fspath(video_csv), ("narration_id", "verb_class", "all_noun_classes"), kind="csv"
  )
  st = read_table(os.fspath(sentence_csv), ("narration_id", "narration"), kind="csv")
  videos, sentences = vt.rows, st.rows
  index = {row["narration_id"]: i for i, row in enumerate(videos)}
  verbs = np.array([_int_cell(vt, i, "verb_class") for i in range(len(videos))], np.int64)
  nouns = tuple(
    parse_class_list(row["all_noun_classes"], f"{video_csv}:{vt.lines[i]}")
    for i, row in enumerate(videos)
  )
  unknown = [i for i, row in enumerate(sentences) if row["narration_id"] not in index]
  if unknown:
    raise UserInputError(
      sentence_csv,
      f"{len(unknown)} caption narration_id(s) are not video segments, e.g. "
      f"{[sentences[i]['narration_id'] for i in unknown[:5]]}",
      line=st.lines[unknown[0]],
      key="narration_id",
      expected=f"the narration_id of a row of {video_csv}",
    )
  source = [index[row["narration_id"]] for row in sentences]
  return Ek100MirAnnotations(
    video_ids=tuple(row["narration_id"] for row in videos),
    video_verbs=verbs,
    video_nouns=nouns,
    caption_ids=tuple(row["narration_id"] for row in sentences),
    captions=tuple(row["narration"] for row in sentences),
    caption_verbs=verbs[source],
    caption_nouns=tuple(nouns[i] for i in source),
  )


def video_subset(
  annotations: Ek100MirAnnotations, videos: int | Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
  """`(video rows, caption columns)` of a validation slice: some videos and the captions whose
  `narration_id` is one of them (the same relevancy definition, smaller).

  `videos` is a count (the first `videos` videos of the CSV) or the video ids (`narration_id`s
  of `EPIC_100_retrieval_test.csv`) to keep; rows come in the CSV's order either way.

  Example:
    >>> ann = Ek100MirAnnotations(("a", "b"), np.array([0, 1]), ((0,), (1,)), ("b", "a"),
    ...                           ("x", "y"), np.array([1, 0]), ((1,), (0,)))
    >>> [k.tolist() for k in video_subset(ann, 1)]
    [[0], [1]]
    >>> [k.tolist() for k in video_subset(ann, ["b"])]
    [[1], [0]]
    >>> video_subset(ann, ["b", "zz"])
    Traceback (most recent call last):
    ...
    ValueError: 1 unknown video id(s) (not a narration_id of the validation videos): 'zz'
  """
  if isinstance(videos, str):
    raise ValueError(
      f"videos must be a count or a sequence of video ids, got the string {videos!r}"
    )
  if isinstance(videos, Sequence) or isinstance(videos, np.ndarray):
    keep_v = _video_rows(annotations, [str(v) for v in videos])
    what = f"the {len(keep_v)} given videos"
  elif isinstance(videos, (int, np.integer)) and not isinstance(videos, bool) and videos > 0:
    keep_v = np.arange(min(int(videos), len(annotations.video_ids)))
    what = f"the first {videos} videos"
  else:
    raise ValueError(
      f"the validation videos (max_videos) must be a positive int or a sequence of video "
      f"ids, got {videos!r}"
    )
  kept = set(annotations.video_ids[i] for i in keep_v)
  keep_c = np.array([j for j, cid in enumerate(annotations.caption_ids) if cid in kept], np.int64)
  if keep_c.size == 0:
    raise ValueError(f"no caption belongs to {what}; take more videos")
  return keep_v, keep_c


def _video_rows(annotations: Ek100MirAnnotations, ids: list[str]) -> np.ndarray:
  """Rows of `ids` in the video CSV, in its order; a `ValueError` names unknown ids."""
  if not ids:
    raise ValueError("the list of video ids is empty")
  row = {vid: i for i, vid in enumerate(annotations.video_ids)}
  unknown = [v for v in dict.fromkeys(ids) if v not in row]
  if unknown:
    shown = ", ".join(repr(v) for v in unknown[:5]) + (", ..." if len(unknown) > 5 else "")
    raise ValueError(
      f"{len(unknown)} unknown video id(s) (not a narration_id of the validation videos): {shown}"
    )
  return np.array(sorted({row[v] for v in ids}), np.int64)


def _multi_hot(sets: Sequence[Sequence[int]], width: int) -> np.ndarray:
  out = np.zeros((len(sets), width), np.float32)
  rows = np.repeat(np.arange(len(sets)), [len(s) for s in sets])
  cols = np.fromiter((c for s in sets for c in s), np.int64, count=len(rows))
  out[rows, cols] = 1.0
  return out


def _unique_classes(verbs: np.ndarray, nouns: Sequence[Sequence[int]]):
  """Distinct (verb, noun set) pairs and, for each item, the index of its pair."""
  index: dict[tuple[int, tuple[int, ...]], int] = {}
  inverse = np.fromiter(
    (
      index.setdefault((int(v), tuple(sorted(set(n)))), len(index))
      for v, n in zip(verbs, nouns, strict=True)
    ),
    np.int64,
    count=len(verbs),
  )
  keys = list(index)
  return np.array([k[0] for k in keys], np.int64), [k[1] for k in keys], inverse


def class_relevancy(
  verbs_a, nouns_a: Sequence[Sequence[int]], verbs_b, nouns_b: Sequence[Sequence[int]]
) -> np.ndarray:
  r"""`0.5 * [verb_a == verb_b] + 0.5 * |N_a \cap N_b| / |N_a \cup N_b|` for every pair.

  Args:
    verbs_a, nouns_a: verb class and noun class set of each of A items (videos).
    verbs_b, nouns_b: the same for B items (captions).

  Returns:
    (A, B) float32, computed in float64 (so 1/3 etc. round once); two empty noun sets have IoU 0.
    Duplicate classes in one list count once. Only distinct (verb, noun set) pairs are compared
    (EK-100 validation: about a tenth of the items), then expanded.

  Example:
    >>> class_relevancy([0, 1], [[2], [2, 3]], [0], [[2, 3]])
    array([[0.75],
           [0.5 ]], dtype=float32)
  """
  verbs_a = np.asarray(verbs_a)
  verbs_b = np.asarray(verbs_b)
  if verbs_a.shape != (len(nouns_a),) or verbs_b.shape != (len(nouns_b),):
    raise ValueError(
      f"class_relevancy: one verb per noun set needed, got {verbs_a.shape} verbs for "
      f"{len(nouns_a)} noun sets and {verbs_b.shape} for {len(nouns_b)}"
    )
  negative = [c for s in list(nouns_a) + list(nouns_b) for c in s if c < 0]
  if negative:
    raise ValueError(f"class_relevancy: noun classes must be >= 0, got {negative[:5]}")
  va, na, inv_a = _unique_classes(verbs_a, nouns_a)
  vb, nb, inv_b = _unique_classes(verbs_b, nouns_b)
  width = 1 + max((c for s in na + nb for c in s), default=0)
  hot_a, hot_b = _multi_hot(na, width), _multi_hot(nb, width)
  # Products of 0/1 summed over <= 2^24 classes are exact in float32.
  inter = (hot_a @ hot_b.T).astype(np.float64)
  union = hot_a.sum(1, dtype=np.float64)[:, None] + hot_b.sum(1, dtype=np.float64)[None] - inter
  iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
  table = (0.5 * (va[:, None] == vb[None, :]) + 0.5 * iou).astype(np.float32)
  return table[inv_a[:, None], inv_b[None, :]]


def ek100_relevancy(annotations: Ek100MirAnnotations | str | os.PathLike) -> np.ndarray:
  """The (videos, captions) relevancy of the EK-100 MIR validation split, float32.

  Args:
    annotations: `read_ek100_mir(...)` output, or the directory holding the two CSVs.

  Example:
    >>> import os, tempfile
    >>> d = tempfile.mkdtemp()  # three segments, two captions (real files: ../shared/data/ek100)
    >>> with open(os.path.join(d, "EPIC_100_retrieval_test.csv"), "w") as f:
    ...   _ = f.write("narration_id,verb_class,all_noun_classes\\n"
    ...               'a,0,[2]\\nb,1,[2]\\nc,0,"[2, 5]"\\n')
    >>> with open(os.path.join(d, "EPIC_100_retrieval_test_sentence.csv"), "w") as f:
    ...   _ = f.write("narration_id,narration\\na,take plate\\nc,take plate and fork\\n")
    >>> ek100_relevancy(d).tolist()  # 0.5 [same verb] + 0.5 IoU(noun sets)
    [[1.0, 0.75], [0.5, 0.25], [0.75, 1.0]]
  """
  if not isinstance(annotations, Ek100MirAnnotations):
    annotations = read_ek100_mir(annotations)
  return class_relevancy(
    annotations.video_verbs,
    annotations.video_nouns,
    annotations.caption_verbs,
    annotations.caption_nouns,
  )
