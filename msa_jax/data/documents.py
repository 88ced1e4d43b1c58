"""User text inputs as memory documents: JSONL records, .txt/.md files, or directories of them.

Splitting (`split_text`, pure):

- FILE: the whole text, stripped; nothing if it is empty or whitespace only.
- PARAGRAPH: paragraphs are separated by one or more blank lines (a line holding only whitespace
  counts as blank). Each is stripped; inner single newlines are kept.
- CHARS:N (N >= 16): the paragraphs, each packed greedily into pieces of at most N characters.
  A piece ends at the last sentence end that fits ('.', '!' or '?', optionally followed by
  closing quotes or brackets, then whitespace or the end of the paragraph); failing that at the
  last word end that fits; failing that (a single word longer than N) it is cut at exactly N
  characters. So pieces hold as many whole sentences as fit, a sentence longer than N is broken
  at whitespace, and the tail of such a sentence shares a piece with the sentences after it.
  Abbreviations ("e.g. ") count as sentence ends: there is no language model here.

  Invariant: a paragraph equals its pieces concatenated in order with whitespace-only gaps
  between them (empty only where a long word was cut). Every piece is non-empty, stripped, at
  most N characters, and lies inside one paragraph.

Reading (`read_documents`; `DocumentsError` names the file, and the line or byte offset):

- `.jsonl`: one JSON object per non-blank line with a string "text" (non-empty after strip), an
  optional integer "id" (>= 0; a bool is not an int) and an optional string "title"; null counts
  as absent and other keys are ignored. Ids are unique across the whole input. With no split a
  record is one document, its text as given. With a split a record becomes its pieces, each
  keeping the title; a record with an id that splits into several pieces is an error.
- `.txt` / `.md`: split (PARAGRAPH when none is given); the title is the file name.
- directory: every .txt, .md and .jsonl file under it, recursively, sorted by relative path
  ('/'-separated, by code point); hidden files and directories (a leading '.') are skipped,
  other extensions ignored, symlinked directories not followed. Titles of file pieces are the
  relative paths.
- Extensions are matched case-insensitively. Files are decoded as UTF-8 (a leading BOM is
  removed); a NUL byte means "binary". Text files get universal newlines ('\\r\\n' and '\\r'
  become '\\n'). An input that yields no documents at all is an error.

Order: files in sorted order, then records or pieces in file order.
"""

from __future__ import annotations

import argparse
import bisect
import codecs
import dataclasses
import enum
import json
import os
import pathlib
import re

MIN_CHARS = 16
SUFFIXES = (".jsonl", ".txt", ".md")
_TEXT_SUFFIXES = (".txt", ".md")

# A blank line: a newline, then whitespace-only lines, each ending in a newline.
_PARAGRAPH_BREAK = re.compile(r"\n(?:[^\S\n]*\n)+")
_WORD = re.compile(r"\S+")
_NON_SPACE = re.compile(r"\S")
# Sentence end: terminal punctuation, optional closers, then whitespace or the end of the text.
_SENTENCE_END = re.compile(r"[.!?][\"'”’»)\]}]*(?=\s|\Z)")
_CHARS = re.compile(r"chars:(\d+)")


class DocumentsError(ValueError):
  """Input that cannot be turned into documents; the message names the file."""


@dataclasses.dataclass(frozen=True)
class TextDoc:
  """One memory document: its text, a title for display, and an optional caller-chosen id."""
  text: str
  title: str | None = None
  id: int | None = None


class SplitKind(enum.Enum):
  FILE = "file"
  PARAGRAPH = "paragraph"
  CHARS = "chars"


@dataclasses.dataclass(frozen=True)
class Split:
  """How text becomes documents; `chars` is the piece length limit of CHARS."""
  kind: SplitKind
  chars: int | None = None

  def __post_init__(self):
    if self.kind is SplitKind.CHARS:
      if isinstance(self.chars, bool) or not isinstance(self.chars, int) or self.chars < MIN_CHARS:
        raise DocumentsError(f"chars must be an integer >= {MIN_CHARS}, got {self.chars!r}")
    elif self.chars is not None:
      raise DocumentsError(f"chars applies to the chars split only, not {self.kind.value}")

  @classmethod
  def parse(cls, s: str) -> Split:
    """'file' | 'paragraph' | 'chars:N' (N >= 16); case and surrounding spaces are ignored."""
    value = s.strip().lower()
    if value == SplitKind.FILE.value:
      return cls(SplitKind.FILE)
    if value == SplitKind.PARAGRAPH.value:
      return cls(SplitKind.PARAGRAPH)
    match = _CHARS.fullmatch(value)
    if match and int(match[1]) >= MIN_CHARS:
      return cls(SplitKind.CHARS, int(match[1]))
    raise DocumentsError(
        f"invalid split {s!r}: expected 'file', 'paragraph' or 'chars:N' with an integer "
        f"N >= {MIN_CHARS}")

  def __str__(self) -> str:
    return f"chars:{self.chars}" if self.kind is SplitKind.CHARS else self.kind.value


def split_arg(s: str) -> Split:
  """`Split.parse` for argparse's `type=`."""
  try:
    return Split.parse(s)
  except DocumentsError as e:
    raise argparse.ArgumentTypeError(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Splitting


def paragraphs(text: str) -> list[str]:
  """Paragraphs separated by blank lines, stripped, whitespace-only ones dropped."""
  return [p.strip() for p in _PARAGRAPH_BREAK.split(text) if p.strip()]


def _last_within(ends: list[int], start: int, limit: int) -> int | None:
  """The largest e in sorted `ends` with start < e <= limit."""
  i = bisect.bisect_right(ends, limit) - 1
  return ends[i] if i >= 0 and ends[i] > start else None


def _pack(paragraph: str, n: int) -> list[str]:
  """Greedy pieces of at most n characters of one stripped, non-empty paragraph."""
  size = len(paragraph)
  word_ends = [m.end() for m in _WORD.finditer(paragraph)]
  sentence_ends = [m.end() for m in _SENTENCE_END.finditer(paragraph)]
  if not sentence_ends or sentence_ends[-1] != size:
    sentence_ends.append(size)  # the paragraph's end always closes a piece
  pieces, start = [], 0
  while start < size:
    limit = start + n
    end = (_last_within(sentence_ends, start, limit)
           or _last_within(word_ends, start, limit)
           or limit)  # a word longer than n: hard cut
    pieces.append(paragraph[start:end])
    nxt = _NON_SPACE.search(paragraph, end)
    start = nxt.start() if nxt else size
  return pieces


def split_text(text: str, split: Split) -> list[str]:
  """Text -> non-empty stripped pieces (see the module docstring)."""
  if split.kind is SplitKind.FILE:
    stripped = text.strip()
    return [stripped] if stripped else []
  if split.kind is SplitKind.PARAGRAPH:
    return paragraphs(text)
  return [piece for p in paragraphs(text) for piece in _pack(p, split.chars)]


def describe(doc: TextDoc, words: int = 8) -> str:
  """The title if any, else the first `words` words of the text (with '…' when cut)."""
  if doc.title:
    return doc.title
  tokens = doc.text.split()
  head = " ".join(tokens[:words])
  return head + "…" if len(tokens) > words else head


# ----------------------------------------------------------------------------------------------
# Reading


def _decode(data: bytes, name: str) -> str:
  """UTF-8 bytes -> str without a BOM; binary or invalid input -> DocumentsError."""
  nul = data.find(b"\0")
  if nul >= 0:
    raise DocumentsError(f"{name}: looks binary (NUL byte at byte offset {nul}); "
                         "expected UTF-8 text")
  skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
  try:
    return data[skip:].decode("utf-8")
  except UnicodeDecodeError as e:
    offset = skip + e.start
    line = data.count(b"\n", 0, offset) + 1
    raise DocumentsError(f"{name}: not valid UTF-8 at byte offset {offset} (line {line})") from None


def _read_text(path: pathlib.Path) -> str:
  try:
    data = path.read_bytes()
  except OSError as e:
    raise DocumentsError(f"{path}: cannot read ({e.strerror or e})") from None
  return _decode(data, str(path))


def _type_name(value) -> str:
  return "null" if value is None else type(value).__name__


class _Ids:
  """Ids seen so far across one input, with where each was first used."""

  def __init__(self):
    self.first: dict[int, str] = {}

  def claim(self, doc_id: int, where: str):
    if doc_id in self.first:
      raise DocumentsError(f"{where}: duplicate id {doc_id} (first used at {self.first[doc_id]})")
    self.first[doc_id] = where


def _record(line: str, where: str) -> tuple[str, str | None, int | None]:
  """One JSONL line -> (text, title, id), validated."""
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise DocumentsError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
  if not isinstance(obj, dict):
    raise DocumentsError(f"{where}: expected a JSON object, got {_type_name(obj)}")
  text = obj.get("text")
  if "text" not in obj:
    raise DocumentsError(f'{where}: missing "text"')
  if not isinstance(text, str):
    raise DocumentsError(f'{where}: "text" must be a string, got {_type_name(text)}')
  if not text.strip():
    raise DocumentsError(f'{where}: "text" is empty')
  doc_id = obj.get("id")
  # bool is a subclass of int, but `true` is no document id.
  if doc_id is not None and (isinstance(doc_id, bool) or not isinstance(doc_id, int)
                             or doc_id < 0):
    raise DocumentsError(f'{where}: "id" must be a non-negative integer, got {json.dumps(doc_id)}')
  title = obj.get("title")
  if title is not None and not isinstance(title, str):
    raise DocumentsError(f'{where}: "title" must be a string, got {_type_name(title)}')
  return text, title, doc_id


def _read_jsonl(path: pathlib.Path, split: Split | None, ids: _Ids) -> list[TextDoc]:
  docs = []
  # Only '\n' ends a record: JSON strings may hold raw U+2028 and similar line separators.
  for lineno, line in enumerate(_read_text(path).split("\n"), start=1):
    if not line.strip():
      continue
    where = f"{path}:{lineno}"
    text, title, doc_id = _record(line, where)
    if doc_id is not None:
      ids.claim(doc_id, where)
    if split is None:
      docs.append(TextDoc(text, title, doc_id))
      continue
    pieces = split_text(text, split)
    if doc_id is not None and len(pieces) > 1:
      raise DocumentsError(
          f"{where}: the record with id {doc_id} splits into {len(pieces)} pieces under split "
          f"'{split}'; an id names one document, so drop the id or choose a coarser split")
    docs.extend(TextDoc(piece, title, doc_id) for piece in pieces)
  return docs


def _read_text_file(path: pathlib.Path, title: str, split: Split | None) -> list[TextDoc]:
  text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
  pieces = split_text(text, split or Split(SplitKind.PARAGRAPH))
  return [TextDoc(piece, title) for piece in pieces]


def _read_file(path: pathlib.Path, title: str, split: Split | None, ids: _Ids) -> list[TextDoc]:
  if path.suffix.lower() == ".jsonl":
    return _read_jsonl(path, split, ids)
  return _read_text_file(path, title, split)


def _walk(root: pathlib.Path) -> list[str]:
  """Relative '/'-paths of the supported, non-hidden files under root, sorted."""
  found = []
  for folder, dirs, files in os.walk(root):
    dirs[:] = [d for d in dirs if not d.startswith(".")]  # prune hidden directories
    rel = pathlib.Path(folder).relative_to(root)
    for name in files:
      if not name.startswith(".") and pathlib.Path(name).suffix.lower() in SUFFIXES:
        found.append((rel / name).as_posix())
  return sorted(found)


def read_documents(path: str | os.PathLike, split: Split | None = None) -> list[TextDoc]:
  """A .jsonl, .txt or .md file, or a directory of them -> documents (module docstring)."""
  root = pathlib.Path(path)
  ids = _Ids()
  if root.is_dir():
    files = _walk(root)
    if not files:
      raise DocumentsError(f"no .txt, .md or .jsonl files in {root}")
    docs = [doc for rel in files for doc in _read_file(root / rel, rel, split, ids)]
  elif root.is_file():
    if root.suffix.lower() not in SUFFIXES:
      kind = f"'{root.suffix}'" if root.suffix else "without an extension"
      raise DocumentsError(f"{root}: unsupported file type {kind}; supported: "
                           f"{', '.join(SUFFIXES)} files or a directory of them")
    docs = _read_file(root, root.name, split, ids)
  elif root.exists():
    raise DocumentsError(f"{root}: not a regular file or directory")
  else:
    raise DocumentsError(f"{root}: no such file or directory")
  if not docs:
    raise DocumentsError(f"no documents in {root}")
  return docs
