"""Text material for the synthetic tasks: word lists, needle keys and values, generated prose.

Everything here is a pure function of a numpy Generator (or of its string argument), so that a
sample is fully determined by the seed it was built from.

Train/test disjointness is a property of the string itself: `split_of` hashes it, and `draw`
rejects candidates until one belongs to the requested split. Any key or value that a generator
emits for TRAIN therefore never appears as a key or value of a TEST sample, and vice versa.
"""

import enum
import functools
import hashlib
import importlib.resources
import re
import uuid as uuid_lib
from collections.abc import Callable, Iterator, Sequence

import numpy as np

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Words kept out of the generated prose so that it can never spell the needle phrase.
_PROSE_BANNED = frozenset({"special", "magic", "magical"})

_ADVERBS = ("quietly", "slowly", "often", "rarely", "suddenly", "carefully", "always", "sometimes",
            "eventually", "gladly", "briefly", "openly", "gently", "loudly", "seldom", "later",
            "happily", "barely", "calmly", "boldly")
_PREPOSITIONS = ("near", "beside", "under", "above", "behind", "within", "across", "beyond",
                 "around", "toward", "without", "after", "before", "inside", "along")
_MODALS = ("can", "will", "should", "might", "must", "would", "could", "may", "did not",
           "will never", "cannot", "seems to")
_DETERMINERS = ("the", "a", "every", "this", "that", "one", "no", "another")


class Split(enum.IntEnum):
  """Which half of the string space a key or value belongs to."""
  TRAIN = 0
  TEST = 1


def split_of(value: str) -> Split:
  """TEST for about one string in ten, chosen by a stable hash (not Python's salted hash())."""
  digest = hashlib.blake2b(value.encode("utf-8"), digest_size=8).digest()
  return Split.TEST if int.from_bytes(digest, "little") % 10 == 0 else Split.TRAIN


def draw(make: Callable[[np.random.Generator], str], rng: np.random.Generator,
         split: Split) -> str:
  """Calls make(rng) until the result belongs to `split` (about 10 tries for TEST)."""
  while True:
    value = make(rng)
    if split_of(value) == split:
      return value


def _read_words(name: str) -> list[str]:
  try:
    path = importlib.resources.files("wonderwords.assets").joinpath(name)
    return path.read_text(encoding="utf-8").splitlines()
  except (FileNotFoundError, ModuleNotFoundError, AttributeError):
    # Older layouts: the package's own loader knows where the lists live.
    from wonderwords import random_word
    return random_word._get_words_from_text_file(name)  # pylint: disable=protected-access


@functools.cache
def _word_list(name: str) -> tuple[str, ...]:
  """Sorted, deduplicated, lowercase ascii-alpha words of a bundled list, profanities removed.

  Capitalised entries (acronyms such as "ATM") and multi-word or hyphenated entries are dropped.
  """
  banned = {w.strip().lower() for w in _read_words("profanitylist.txt")}
  words = {w.strip() for w in _read_words(name)}
  return tuple(sorted(w for w in words
                      if w.isascii() and w.isalpha() and w.islower() and w not in banned))


def adjectives() -> tuple[str, ...]:
  return _word_list("adjectivelist.txt")


def nouns() -> tuple[str, ...]:
  return _word_list("nounlist.txt")


@functools.cache
def _prose_words() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
  """(adjectives, nouns, verbs) for prose: banned words removed, verbs in base form only."""
  adj = tuple(w for w in adjectives() if w not in _PROSE_BANNED)
  noun = tuple(w for w in nouns() if w not in _PROSE_BANNED)
  # A few entries of the verb list are past forms ("altered"); the modal grammar needs base forms.
  verb = tuple(w for w in _word_list("verblist.txt")
               if w not in _PROSE_BANNED and (not w.endswith("ed") or w.endswith("eed")))
  return adj, noun, verb


def _pick(rng: np.random.Generator, words: Sequence[str]) -> str:
  return words[int(rng.integers(len(words)))]


def key_word(rng: np.random.Generator) -> str:
  """RULER's word key: "{adjective}-{noun}"."""
  return f"{_pick(rng, adjectives())}-{_pick(rng, nouns())}"


def uuid(rng: np.random.Generator) -> str:
  """A version-4 UUID string built from 128 random bits of rng."""
  return str(uuid_lib.UUID(int=int.from_bytes(rng.bytes(16), "little"), version=4))


def number(rng: np.random.Generator) -> str:
  """A 7-digit decimal string, uniform in [10^6, 10^7 - 1]."""
  return str(int(rng.integers(10**6, 10**7)))


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _np(rng: np.random.Generator, adj: Sequence[str] | None, noun: Sequence[str]) -> str:
  """A noun phrase "det [adj] noun" with a/an agreeing with the next word."""
  words = ([_pick(rng, adj)] if adj is not None else []) + [_pick(rng, noun)]
  det = _pick(rng, _DETERMINERS)
  if det == "a":
    det = _article(words[0])
  return " ".join([det] + words)


def essay_sentence(rng: np.random.Generator) -> str:
  """One seeded grammar sentence of "essay" prose: words only, no digits, ends with a period."""
  adj, noun, verb = _prose_words()

  def bare() -> str:
    return _np(rng, None, noun)

  def rich() -> str:
    return _np(rng, adj, noun)

  def vp() -> str:
    return f"{_pick(rng, _MODALS)} {_pick(rng, verb)}"

  form = int(rng.integers(7))
  if form == 0:
    s = f"{rich()} {vp()} {bare()}"
  elif form == 1:
    s = f"{_pick(rng, _ADVERBS)}, {bare()} {vp()} {rich()} {_pick(rng, _PREPOSITIONS)} {bare()}"
  elif form == 2:
    s = f"{bare()} {_pick(rng, _PREPOSITIONS)} {bare()} {vp()} {bare()} {_pick(rng, _ADVERBS)}"
  elif form == 3:
    s = f"nobody knows why {bare()} {vp()} {rich()}"
  elif form == 4:
    s = f"{bare()} is {_pick(rng, adj)}, but {bare()} is {_pick(rng, adj)}"
  elif form == 5:
    s = f"if {bare()} {vp()} {bare()}, then {bare()} {vp()} it too"
  else:
    s = f"{rich()} and {rich()} {vp()} {_pick(rng, _ADVERBS)}"
  return s[0].upper() + s[1:] + "."


def essay_sentences(rng: np.random.Generator) -> Iterator[str]:
  """An endless stream of essay sentences drawn from rng."""
  while True:
    yield essay_sentence(rng)


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def split_sentences(text: str) -> list[str]:
  """Splits after '.', '!' or '?' followed by whitespace; empty pieces are dropped."""
  return [s for s in _SENTENCE_END.split(text.strip()) if s]


def pack_documents(stream: Iterator[str], inserts: Sequence[Sequence[str]], doc_chars: int,
                   rng: np.random.Generator) -> list[str]:
  """Cuts a sentence stream into len(inserts) documents and places inserts[d] inside document d.

  Document d takes the next whole sentences of `stream` while the document, counting its inserted
  sentences and one space between sentences, stays within doc_chars; the sentence that would
  overflow starts the next document. A document always holds at least one sentence, so it exceeds
  doc_chars only when one sentence (or its inserts alone) is longer. Each insert then goes at a
  uniformly random sentence boundary. Sentences are joined with single spaces.
  """
  docs = []
  pending = None
  for extra in inserts:
    size = sum(len(s) for s in extra) + max(len(extra) - 1, 0)
    count = len(extra)
    body = []
    while True:
      s = pending if pending is not None else next(stream)
      pending = None
      grown = size + len(s) + (1 if count else 0)
      if count and grown > doc_chars:
        pending = s
        break
      body.append(s)
      size, count = grown, count + 1
    for s in extra:
      body.insert(int(rng.integers(len(body) + 1)), s)
    docs.append(" ".join(body))
  return docs
