"""Tokenizers for text documents: a dependency-free byte tokenizer and offline HF tokenizer.json.

Both map the MSA control strings (`Special`) to single ids, so prompts can be written as text.
`byte_tokenizer_json()` is the byte tokenizer as a tokenizer.json (the same ids for every text),
which is what a checkpoint of a byte-level model carries.
"""

import enum
import json
import pathlib
import re
from collections.abc import Iterable
from typing import Protocol

import numpy as np


class Special(enum.IntEnum):
  """Control tokens; the values are the ByteTokenizer ids (after the 256 byte ids)."""
  PAD = 256
  IM_START = 257
  IM_END = 258
  REF_END = 259  # delimiter after generated document ids
  END_RETRIEVE = 260
  EOS = 261


SPECIAL_TEXT = {
    Special.PAD: "<pad>",
    Special.IM_START: "<|im_start|>",
    Special.IM_END: "<|im_end|>",
    Special.REF_END: "<|object_ref_end|>",
    Special.END_RETRIEVE: "<End-of-Retrieve>",
    Special.EOS: "<|endoftext|>",
}


class Tokenizer(Protocol):
  vocab_size: int

  def encode(self, text: str) -> np.ndarray:
    """text -> int32 [L] ids; special strings in the text become their single ids."""

  def decode(self, ids: Iterable[int]) -> str:
    """ids -> text, special ids rendered as their strings."""

  def special(self, s: Special) -> int:
    """The id of a control token."""


_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TEXT.values()) + ")")
_TEXT_SPECIAL = {t: s for s, t in SPECIAL_TEXT.items()}


class ByteTokenizer:
  """UTF-8 bytes (ids 0-255) plus the six `Special` ids (256-261).

  vocab_size is 264: 262 used ids padded to a multiple of 8 for embedding tables. decode skips
  the two padding ids and negative ids (e.g. -100 labels), and rejects ids >= 264.
  """
  vocab_size = 264

  def encode(self, text: str) -> np.ndarray:
    ids = []
    for piece in _SPECIAL_RE.split(text):
      if piece in _TEXT_SPECIAL:
        ids.append(int(_TEXT_SPECIAL[piece]))
      else:
        ids.extend(piece.encode("utf-8"))
    return np.asarray(ids, dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    out, pending = [], bytearray()
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if 0 <= i < 256:
        pending.append(i)
        continue
      if i >= self.vocab_size:
        raise ValueError(f"token id {i} is outside the byte vocabulary of {self.vocab_size}")
      if i in SPECIAL_TEXT:
        # Bytes are decoded per run, so a multi-byte character is never split by a special.
        out.append(pending.decode("utf-8", errors="replace"))
        pending = bytearray()
        out.append(SPECIAL_TEXT[Special(i)])
    out.append(pending.decode("utf-8", errors="replace"))
    return "".join(out)

  def special(self, s: Special) -> int:
    return int(s)


class HFTokenizer:
  """A `tokenizers` tokenizer.json read from disk (never the hub).

  The control strings must be tokens of that vocabulary (normally added special tokens); special()
  raises ValueError for one that is missing (Qwen3, for instance, has no "<End-of-Retrieve>").

  vocab_size is one more than the largest id, so every id it produces is below it; a model's
  embedding table may be larger (the byte tokenizer.json has 262 ids, ByteTokenizer pads to 264).
  `json` is the file's text as read, which `save_checkpoint` copies into a checkpoint.
  """

  def __init__(self, path: str | pathlib.Path):
    import tokenizers  # deferred: only needed for real vocabularies
    self.path = str(path)
    try:
      # Bytes, not read_text: universal newlines would change the text that a checkpoint copies.
      self.json = pathlib.Path(self.path).read_bytes().decode("utf-8")
      self._tok = tokenizers.Tokenizer.from_str(self.json)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
      raise ValueError(f"cannot read tokenizer file {self.path}: {e}") from e
    ids = self._tok.get_vocab(with_added_tokens=True).values()
    self.vocab_size = max(ids, default=-1) + 1

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    ids = [i for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist() if i >= 0]
    return self._tok.decode(ids, skip_special_tokens=False)

  def special(self, s: Special) -> int:
    text = SPECIAL_TEXT[s]
    i = self._tok.token_to_id(text)
    if i is None:
      raise ValueError(f"tokenizer {self.path} has no token {text!r} ({s.name})")
    return i


def load_tokenizer(path: str | pathlib.Path | None) -> Tokenizer:
  """None -> ByteTokenizer; a tokenizer.json, or a directory holding one -> HFTokenizer."""
  if path is None:
    return ByteTokenizer()
  p = pathlib.Path(path)
  if p.is_dir():
    p = p / "tokenizer.json"
  if not p.is_file():
    raise ValueError(f"no tokenizer file at {p}")
  return HFTokenizer(p)


def _byte_symbols() -> list[str]:
  """GPT-2's printable stand-in for each byte, the one `pre_tokenizers.ByteLevel` maps byte b to.

  Printable Latin-1 bytes stand for themselves; the others take 256, 257, ... in byte order.
  """
  printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
  spare = iter(range(256, 512))
  return [chr(b) if b in printable else chr(next(spare)) for b in range(256)]


def byte_tokenizer_json() -> str:
  """`ByteTokenizer` as a `tokenizers` tokenizer.json: the same ids for every text.

  Byte-level pre-tokenization with neither a prefix space nor the regex split, a BPE model without
  merges whose vocabulary maps the symbol of byte b to id b, the control strings as special tokens
  256-261 in `Special` order, and no normalizer (which would change the bytes). Written out here
  rather than by the library's serializer, so that the bytes do not depend on its version.
  """
  byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                "use_regex": False}
  added = [{"id": int(s), "content": SPECIAL_TEXT[s], "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": False, "special": True} for s in Special]
  model = {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
           "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
           "vocab": {c: b for b, c in enumerate(_byte_symbols())}, "merges": []}
  d = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
       "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
       "decoder": byte_level, "model": model}
  return json.dumps(d, indent=2, ensure_ascii=False) + "\n"


def byte_hf_tokenizer():
  """`byte_tokenizer_json()` as a `tokenizers.Tokenizer`."""
  import tokenizers
  return tokenizers.Tokenizer.from_str(byte_tokenizer_json())


def tokenizer_json(tok: Tokenizer) -> str:
  """The tokenizer.json text of `tok`: the byte one, or an HFTokenizer's file as it was read."""
  if isinstance(tok, ByteTokenizer):
    return byte_tokenizer_json()
  if isinstance(tok, HFTokenizer):
    return tok.json
  raise TypeError(f"cannot write {type(tok).__name__} as a tokenizer.json; expected a "
                  "ByteTokenizer or an HFTokenizer")
