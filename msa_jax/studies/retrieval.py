"""BM25 retrieval over a study memory (the RAG baselines), with `rank_bm25`."""

from __future__ import annotations

import re
from typing import Sequence

import numpy as np
from rank_bm25 import BM25Okapi

_WORD = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")


def words(text: str) -> list[str]:
  """Lower-cased words; hyphenated keys (`evasive-consul`) and uuids stay one term."""
  return _WORD.findall(text.lower())


class BM25:
  """Okapi BM25 over documents whose id is their index."""

  def __init__(self, texts: Sequence[str]):
    if not texts:
      raise ValueError("BM25 needs at least one document")
    self._index = BM25Okapi([words(t) for t in texts])

  def top(self, query: str, k: int, exclude: Sequence[int] = ()) -> list[int]:
    """Ids of the k best documents for `query` (ties broken by id), skipping `exclude`."""
    scores = np.asarray(self._index.get_scores(words(query)), np.float64)
    scores[list(exclude)] = -np.inf
    order = np.lexsort((np.arange(scores.size), -scores))
    return [int(i) for i in order[:k] if np.isfinite(scores[i])]

  def iterative(self, query: str, texts: Sequence[str], k: int, hops: int) -> list[int]:
    """Iterative RAG: retrieve k, then again with the query plus the newest documents' text."""
    got: list[int] = []
    q = query
    for _ in range(hops):
      new = self.top(q, k, exclude=got)
      got += new
      q = query + " " + " ".join(texts[i] for i in new)
    return got
