"""Synthetic multi-hop retrieval: each hop's fact sits in its own memory document.

- BRIDGE (2 hops, HotpotQA "bridge" style). Doc A: "The vault of Amber-Lantern is kept by Pell
  Quint." Doc B: "Pell Quint was born in Ostra Vale." Q: "Where was the keeper of the vault of
  Amber-Lantern born?" The bridge entity (Pell Quint) is in A and B only, never in the question, so
  B can only be found by routing on A's text. Distractor documents are hard negatives: the same
  entity under another first-hop relation (with its own second-hop fact), then whole chains that
  use the gold relations with other entities.
- CHAIN (k hops, RULER variable-tracking style), one assignment per document: "VAR ABCDE =
  12345.", "VAR FGHIJ = VAR ABCDE.", ... Q: "What is the value of VAR {last}?" Distractors are a
  branch off the gold chain ("VAR QRSTU = VAR ABCDE.") and other chains of the same length.

Every document holds exactly one fact sentence placed among essay filler sentences, cut with the
same rule as the NIAH documents (`text.pack_documents`). Example.hops lists the gold document per
retrieval round in the order the model must retrieve them (CHAIN: round 1 is the document that
defines the queried variable, the last round the one holding the literal number). Entity names
and values all belong to the requested split.
"""

import dataclasses
import enum
from collections.abc import Callable, Sequence

import numpy as np

from msa_jax.data import niah, text
from msa_jax.data.text import Split

# Keeps these streams apart from the NIAH variants' (which use 0-7 in the same seed position).
_SEED_OFFSET = 100


class HopTask(enum.Enum):
  BRIDGE = "bridge"
  CHAIN = "chain"


class Answer(enum.Enum):
  """Entity type a second-hop relation points to."""
  PLACE = enum.auto()
  PERSON = enum.auto()


@dataclasses.dataclass(frozen=True)
class FirstHop:
  """thing -> person. fact has {x} and {b}; role names the person from {x} inside a question."""
  fact: str
  role: str


@dataclasses.dataclass(frozen=True)
class SecondHop:
  """person -> answer. fact has {b} and {a}; question has {who} (a role phrase)."""
  fact: str
  question: str
  answer: Answer


FIRST_HOPS = (
    FirstHop("The vault of {x} is kept by {b}.", "the keeper of the vault of {x}"),
    FirstHop("The ship {x} is captained by {b}.", "the captain of the ship {x}"),
    FirstHop("The novel {x} was written by {b}.", "the author of the novel {x}"),
    FirstHop("The bridge at {x} was designed by {b}.", "the designer of the bridge at {x}"),
    FirstHop("The orchard {x} is owned by {b}.", "the owner of the orchard {x}"),
    FirstHop("The choir of {x} is led by {b}.", "the leader of the choir of {x}"),
    FirstHop("The lighthouse of {x} is tended by {b}.", "the keeper of the lighthouse of {x}"),
    FirstHop("The painting {x} was made by {b}.", "the painter of {x}"),
    FirstHop("The school of {x} was founded by {b}.", "the founder of the school of {x}"),
    FirstHop("The map of {x} was drawn by {b}.", "the maker of the map of {x}"),
    FirstHop("The archive of {x} is guarded by {b}.", "the guardian of the archive of {x}"),
    FirstHop("The song {x} was composed by {b}.", "the composer of the song {x}"),
)

SECOND_HOPS = (
    SecondHop("{b} was born in {a}.", "Where was {who} born?", Answer.PLACE),
    SecondHop("{b} lives in {a}.", "Where does {who} live?", Answer.PLACE),
    SecondHop("{b} grew up in {a}.", "Where did {who} grow up?", Answer.PLACE),
    SecondHop("{b} works in {a}.", "Where does {who} work?", Answer.PLACE),
    SecondHop("{b} is married to {a}.", "Who is {who} married to?", Answer.PERSON),
    SecondHop("{b} was trained by {a}.", "Who trained {who}?", Answer.PERSON),
    SecondHop("{b} studied under {a}.", "Who did {who} study under?", Answer.PERSON),
    SecondHop("{b} shares a house with {a}.", "Who does {who} share a house with?", Answer.PERSON),
)

_ONSETS = ("b", "d", "f", "g", "h", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kr", "st", "th", "sh", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ea")
_CODAS = ("", "", "", "n", "r", "l", "s", "th", "m")
_PLACE_SUFFIXES = ("Vale", "Ford", "Harbor", "Hollow", "Reach", "Cross", "Marsh", "Point", "Crest",
                   "Haven", "Field", "Wood")


def _pick(rng: np.random.Generator, items: Sequence):
  return items[int(rng.integers(len(items)))]


def syllable_word(rng: np.random.Generator, syllables: int) -> str:
  """A capitalised made-up word such as "Pellor"."""
  word = "".join(_pick(rng, _ONSETS) + _pick(rng, _VOWELS) + _pick(rng, _CODAS)
                 for _ in range(syllables))
  return word.capitalize()


def person(rng: np.random.Generator) -> str:
  return f"{syllable_word(rng, 2)} {syllable_word(rng, 2)}"


def place(rng: np.random.Generator) -> str:
  return f"{syllable_word(rng, 2)} {_pick(rng, _PLACE_SUFFIXES)}"


def thing(rng: np.random.Generator) -> str:
  """A title-cased word key such as "Amber-Lantern"."""
  return "-".join(w.capitalize() for w in text.key_word(rng).split("-"))


def var_name(rng: np.random.Generator) -> str:
  return "".join(chr(ord("A") + int(i)) for i in rng.integers(26, size=5))


def var_value(rng: np.random.Generator) -> str:
  return str(int(rng.integers(10**4, 10**5)))


class _Names:
  """Distinct entity strings of one sample, all from one split.

  A new name must not equal any earlier one nor contain / be contained in a gold entity, so that a
  substring search for a gold entity finds only its own documents.
  """

  def __init__(self, rng: np.random.Generator, split: Split):
    self.rng, self.split = rng, split
    self.used: set[str] = set()
    self.gold: list[str] = []

  def new(self, make: Callable[[np.random.Generator], str], gold: bool = False) -> str:
    while True:
      name = text.draw(make, self.rng, self.split)
      if name not in self.used and not any(name in g or g in name for g in self.gold):
        break
    self.used.add(name)
    if gold:
      self.gold.append(name)
    return name


_ANSWER_MAKERS = {Answer.PLACE: place, Answer.PERSON: person}


def _bridge_facts(rng: np.random.Generator, split: Split, num_docs: int) -> tuple[
    list[str], str, str]:
  """(facts, question, answer); facts[0] and facts[1] are the gold hops, the rest distractors."""
  names = _Names(rng, split)
  first = _pick(rng, FIRST_HOPS)
  second = _pick(rng, SECOND_HOPS)
  x, b = names.new(thing, gold=True), names.new(person, gold=True)
  a = names.new(_ANSWER_MAKERS[second.answer], gold=True)
  facts = [first.fact.format(x=x, b=b), second.fact.format(b=b, a=a)]
  # Hard negative for round 1: the same thing under another relation, with its own second hop.
  other = _pick(rng, [h for h in FIRST_HOPS if h != first])
  b2 = names.new(person)
  facts += [other.fact.format(x=x, b=b2),
            second.fact.format(b=b2, a=names.new(_ANSWER_MAKERS[second.answer]))]
  # Then whole chains with the gold relations and other entities.
  while len(facts) < num_docs:
    b3 = names.new(person)
    facts += [first.fact.format(x=names.new(thing), b=b3),
              second.fact.format(b=b3, a=names.new(_ANSWER_MAKERS[second.answer]))]
  q = second.question.format(who=first.role.format(x=x))
  return facts[:num_docs], q, a


def _chain_facts(rng: np.random.Generator, split: Split, num_docs: int, hops: int) -> tuple[
    list[str], str, str]:
  """(facts, question, answer); facts[:hops] are the gold hops in retrieval order."""
  names = _Names(rng, split)
  chain = [names.new(var_name, gold=True) for _ in range(hops)]
  value = names.new(var_value, gold=True)
  # chain[0] holds the literal; each later variable copies the previous one.
  defs = [f"VAR {chain[0]} = {value}."] + [
      f"VAR {chain[i]} = VAR {chain[i - 1]}." for i in range(1, hops)]
  facts = defs[::-1]
  # Hard negative: a branch that also mentions a gold variable but is never asked about.
  facts.append(f"VAR {names.new(var_name)} = VAR {_pick(rng, chain)}.")
  while len(facts) < num_docs:
    prev = names.new(var_name)
    facts.append(f"VAR {prev} = {names.new(var_value)}.")
    for _ in range(hops - 1):
      cur = names.new(var_name)
      facts.append(f"VAR {cur} = VAR {prev}.")
      prev = cur
  return facts[:num_docs], f"What is the value of VAR {chain[-1]}?", value


def example(task: HopTask, *, seed: int, split: Split, index: int, num_docs: int, hops: int = 2,
            doc_chars: int = 256, id_digits: tuple[int, int] = (1, 6)) -> niah.Example:
  """The index-th multi-hop sample: one fact per document, hops[r] = gold document of round r."""
  if task is HopTask.BRIDGE and hops != 2:
    raise ValueError(f"BRIDGE has exactly 2 hops, got {hops}")
  if hops < 1 or num_docs < hops:
    raise ValueError(f"need 1 <= hops <= num_docs, got hops={hops}, num_docs={num_docs}")
  rng = np.random.default_rng(
      [seed, int(split), _SEED_OFFSET + list(HopTask).index(task), hops, index])
  if task is HopTask.BRIDGE:
    facts, q, answer = _bridge_facts(rng, split, num_docs)
  else:
    facts, q, answer = _chain_facts(rng, split, num_docs, hops)
  where = rng.permutation(num_docs).tolist()  # fact i goes to document where[i]
  inserts: list[list[str]] = [[] for _ in range(num_docs)]
  for fact, d in zip(facts, where):
    inserts[d].append(fact)
  docs = text.pack_documents(text.essay_sentences(rng), inserts, doc_chars, rng)
  rounds = tuple((where[i],) for i in range(hops))
  return niah.Example(
      task=task.value if task is HopTask.BRIDGE else f"{task.value}_{hops}",
      docs=tuple(docs),
      doc_ids=niah.draw_doc_ids(rng, num_docs, id_digits),
      question=q,
      answers=(answer,),
      gold=tuple(sorted(where[:hops])),
      answer_text=answer,
      hops=rounds)
