"""Token roles, in the official `doc_ids` convention (SPEC §2), and the range check of tokens.

`doc_ids >= 1` marks a token of document d; the other roles are the constants below. Padding is
not a role: it is `attention_mask == 0` and is excluded from everything.
"""

QUERY = 0  # active token that routes (the question)
ACTIVE = -1  # active token that does not route (answers, generated text)
TEMPLATE = -2  # template / prefix token
FIRST_DOC = 1  # document ids start here


def token_range_error(input_ids, position_ids, valid, vocab_size: int | None = None) -> str | None:
  """Why token arrays [B, T] cannot be run, naming the array, the [row, column] and the value
  (e.g. "input_ids[1, 3] = 5000 is outside the vocabulary [0, 512)"); None when they can.

  Every input id is embedded, padding included, so ids must be in [0, vocab_size) everywhere
  (only the sign is checked without a vocab_size); positions must be >= 0 on valid tokens.
  """
  import numpy as np  # deferred: the constants above need nothing

  ids, pos, valid = np.asarray(input_ids), np.asarray(position_ids), np.asarray(valid, bool)
  high = np.iinfo(np.int64).max if vocab_size is None else vocab_size
  vocab = f"the vocabulary [0, {vocab_size})" if vocab_size is not None else "the vocabulary"
  for name, a, bad, why in (("input_ids", ids, (ids < 0) | (ids >= high), f"is outside {vocab}"),
                            ("position_ids", pos, valid & (pos < 0), "is negative")):
    if bad.any():
      r, c = np.argwhere(bad)[0]
      return f"{name}[{r}, {c}] = {a[r, c]} {why}"
  return None
