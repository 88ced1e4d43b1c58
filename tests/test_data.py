"""Synthetic data: tokenizers, text material, RULER NIAH documents and multi-hop tasks."""

import json
import re
import uuid as uuid_lib

import numpy as np
import pytest

from msa_jax.data import multihop, niah, text
from msa_jax.data.multihop import HopTask
from msa_jax.data.niah import Variant
from msa_jax.data.text import Split, split_of
from msa_jax.data.tokenizer import (SPECIAL_TEXT, ByteTokenizer, HFTokenizer, Special,
                                    load_tokenizer)

NEEDLE = re.compile(r"One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.")
NUMBER = re.compile(r"^[1-9]\d{6}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
WORD_KEY = re.compile(r"^[a-z]+-[a-z]+$")

# RULER's table: haystack, key pattern, value pattern, #keys, #values per key, #queries.
RULER = {
    Variant.SINGLE_1: ("noise", WORD_KEY, NUMBER, 1, 1, 1),
    Variant.SINGLE_2: ("essay", WORD_KEY, NUMBER, 1, 1, 1),
    Variant.SINGLE_3: ("essay", WORD_KEY, UUID, 1, 1, 1),
    Variant.MULTIKEY_1: ("essay", WORD_KEY, NUMBER, 4, 1, 1),
    Variant.MULTIKEY_2: ("needle", WORD_KEY, NUMBER, 1, 1, 1),
    Variant.MULTIKEY_3: ("needle", UUID, UUID, 1, 1, 1),
    Variant.MULTIVALUE: ("essay", WORD_KEY, NUMBER, 1, 4, 1),
    Variant.MULTIQUERY: ("essay", WORD_KEY, NUMBER, 4, 1, 4),
}


# ---------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer_round_trips_text_with_specials_and_non_ascii():
  tok = ByteTokenizer()
  s = ("<|im_start|>user\n[12]. Grüße, 日本 🙂[12]<|im_end|><|object_ref_end|>"
       "<End-of-Retrieve><pad><|endoftext|>")
  ids = tok.encode(s)
  assert ids.dtype == np.int32 and ids.ndim == 1
  assert tok.decode(ids) == s
  assert ids[0] == 257 and ids.tolist()[-3:] == [260, 256, 261]
  assert tok.encode("é").tolist() == list("é".encode("utf-8"))
  # A special string is one id, never its bytes.
  assert tok.encode("a<|im_end|>b").tolist() == [ord("a"), 258, ord("b")]


def test_byte_tokenizer_ids_and_vocab():
  tok = ByteTokenizer()
  assert tok.vocab_size == 264 and tok.vocab_size % 8 == 0
  assert [tok.special(s) for s in Special] == [256, 257, 258, 259, 260, 261]
  assert tok.special(Special.REF_END) == tok.encode("<|object_ref_end|>").item()
  # Padding ids and negative labels are skipped; out-of-vocabulary ids are an error.
  assert tok.decode([104, 262, -100, 105, 263]) == "hi"
  assert tok.decode(np.array([[104], [105]])) == "hi"
  with pytest.raises(ValueError):
    tok.decode([264])


def _write_hf_tokenizer(path, specials):
  import tokenizers
  from tokenizers import models, pre_tokenizers
  tok = tokenizers.Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2},
                                              unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(specials)
  tok.save(str(path))


def test_hf_tokenizer_loads_offline_file_and_maps_specials(tmp_path):
  present = [t for s, t in SPECIAL_TEXT.items() if s is not Special.END_RETRIEVE]
  _write_hf_tokenizer(tmp_path / "tokenizer.json", present)
  tok = load_tokenizer(tmp_path)  # a directory holding tokenizer.json
  assert isinstance(tok, HFTokenizer)
  assert tok.vocab_size == 3 + len(present)
  im_start = tok.special(Special.IM_START)
  assert im_start >= 3
  ids = tok.encode("hello <|im_start|> world")
  assert ids.dtype == np.int32 and ids.tolist() == [1, im_start, 2]
  assert "<|im_start|>" in tok.decode(ids)
  assert isinstance(load_tokenizer(str(tmp_path / "tokenizer.json")), HFTokenizer)
  with pytest.raises(ValueError, match="<End-of-Retrieve>"):
    tok.special(Special.END_RETRIEVE)


def test_load_tokenizer_defaults_and_errors(tmp_path):
  assert isinstance(load_tokenizer(None), ByteTokenizer)
  with pytest.raises(ValueError, match="missing.json"):
    load_tokenizer(tmp_path / "missing.json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    load_tokenizer(tmp_path)  # a directory without tokenizer.json
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"not": "a tokenizer"}))
  with pytest.raises(ValueError, match="bad.json"):
    load_tokenizer(bad)


# ---------------------------------------------------------------------------- text material

def test_word_lists_are_sorted_unique_lowercase_alpha():
  for words in (text.adjectives(), text.nouns()):
    assert len(words) > 500
    assert list(words) == sorted(set(words))
    assert all(w.isascii() and w.isalpha() and w.islower() for w in words)


def test_key_value_generators():
  rng = np.random.default_rng(0)
  for _ in range(200):
    assert WORD_KEY.match(text.key_word(rng))
    assert NUMBER.match(text.number(rng))
    u = text.uuid(rng)
    assert UUID.match(u) and uuid_lib.UUID(u).version == 4


def test_split_of_is_stable_and_about_one_in_ten_is_test():
  values = [str(i) for i in range(10_000)]
  first = [split_of(v) for v in values]
  assert first == [split_of(v) for v in values]
  assert 0.08 < first.count(Split.TEST) / len(values) < 0.12
  rng = np.random.default_rng(1)
  assert all(split_of(text.draw(text.number, rng, Split.TEST)) is Split.TEST for _ in range(50))
  assert all(split_of(text.draw(text.uuid, rng, Split.TRAIN)) is Split.TRAIN for _ in range(50))


def test_essay_prose_has_no_digits_and_no_needle_phrase():
  rng = np.random.default_rng(2)
  sentences = [text.essay_sentence(rng) for _ in range(2000)]
  for s in sentences:
    assert not re.search(r"\d", s), s
    assert "special magic" not in s.lower(), s
    assert s[0].isupper() and s.endswith(".")
  assert len(set(sentences)) > 1990
  assert text.split_sentences(" ".join(sentences[:50])) == sentences[:50]


def test_split_sentences():
  assert text.split_sentences(text.NOISE) == [
      "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
      "There and back again."]
  assert text.split_sentences("  Why? Yes!  No.\nEnd  ") == ["Why?", "Yes!", "No.", "End"]
  assert text.split_sentences("") == []


def test_pack_documents_cuts_at_sentence_boundaries():
  rng = np.random.default_rng(0)
  stream = iter(["aaaa.", "bbbb.", "cccc.", "x" * 30 + ".", "dddd.", "eeee.", "ffff.", "gggg."])
  docs = text.pack_documents(stream, [[], [], [], ["NN."], []], 11, rng)
  # "aaaa. bbbb." is exactly 11 characters; the overflowing sentence starts the next document; a
  # sentence longer than the limit is a document on its own; inserts count towards the limit and
  # go at a sentence boundary.
  assert docs[:3] == ["aaaa. bbbb.", "cccc.", "x" * 30 + "."]
  assert docs[3] in ("NN. dddd.", "dddd. NN.")
  assert docs[4] == "eeee. ffff."
  # A document whose inserts already fill it takes no haystack sentence.
  assert text.pack_documents(iter(["aaaa."] * 3), [["N" * 20 + "."], []], 11, rng) == [
      "N" * 20 + ".", "aaaa. aaaa."]

# ---------------------------------------------------------------------------- NIAH

def _queried_keys(question: str) -> list[str]:
  m = re.search(r"for (.+) mentioned in the provided text\?$", question)
  return re.split(r", and |, | and ", m.group(1))


def _needles(doc: str) -> list[tuple[str, str, str]]:
  return NEEDLE.findall(doc)


def _check_doc_ids(ex: niah.Example, num_docs: int, id_digits: tuple[int, int]):
  assert len(ex.doc_ids) == num_docs == len(ex.docs)
  assert len(set(ex.doc_ids)) == num_docs
  lo, hi = id_digits
  assert all(isinstance(i, int) and i > 0 and lo <= len(str(i)) <= hi for i in ex.doc_ids)


@pytest.mark.parametrize("variant", list(Variant))
def test_niah_follows_ruler_table(variant):
  haystack, key_re, value_re, n_keys, n_values, n_queries = RULER[variant]
  doc_chars, num_docs = 300, 6
  for index in range(5):
    ex = niah.example(variant, seed=7, split=Split.TRAIN, index=index, num_docs=num_docs,
                      doc_chars=doc_chars)
    assert ex.task == variant.value and ex.hops == ()
    _check_doc_ids(ex, num_docs, (1, 6))
    assert all(len(d) <= doc_chars for d in ex.docs)
    assert sum(len(d) for d in ex.docs) > 0.6 * doc_chars * num_docs  # documents are filled

    queried = _queried_keys(ex.question)
    assert len(queried) == n_queries and all(key_re.match(k) for k in queried)
    singular = n_queries * n_values == 1
    assert ex.question.startswith("What is the special magic" if singular
                                  else "What are all the special magic")
    assert len(ex.answers) == n_queries * n_values == len(set(ex.answers))
    assert all(value_re.match(v) for v in ex.answers)
    if len(ex.answers) == 1:
      assert ex.answer_text == ex.answers[0]
    else:
      assert ex.answer_text == ", ".join(ex.answers[:-1]) + ", and " + ex.answers[-1]

    needles = [(d, key, value) for d, doc in enumerate(ex.docs) for _, key, value in _needles(doc)]
    real = [(d, k, v) for d, k, v in needles if k in queried]
    # The queried needles are exactly the answers, and they sit in the gold documents.
    assert sorted(v for _, _, v in real) == sorted(ex.answers)
    assert ex.gold == tuple(sorted({d for d, _, _ in real}))
    assert len(ex.gold) == min(len(real), num_docs)  # distinct documents where possible
    for g in ex.gold:
      assert any(k in ex.docs[g] for k in queried)
    for d, doc in enumerate(ex.docs):
      if d not in ex.gold:
        assert not any(k in doc for k in queried) and not any(v in doc for v in ex.answers)

    if haystack == "needle":
      # Every haystack sentence is a distractor needle with a fresh key of the same type.
      assert len(needles) > 10
      assert all(key_re.match(k) and value_re.match(v) for _, k, v in needles)
      assert len(real) == 1
    else:
      assert len(needles) == n_keys * n_values
      assert len({k for _, k, _ in needles}) == n_keys
    if haystack == "essay":
      for d, doc in enumerate(ex.docs):
        if not _needles(doc):
          assert not re.search(r"\d", doc)
    if haystack == "noise":
      noise = set(text.split_sentences(text.NOISE))
      for doc in ex.docs:
        assert all(s in noise or NEEDLE.fullmatch(s) for s in text.split_sentences(doc))


@pytest.mark.parametrize("variant", list(Variant))
def test_niah_is_a_pure_function_of_its_arguments(variant):
  kw = dict(seed=3, split=Split.TEST, num_docs=4, doc_chars=200)
  a = niah.example(variant, index=11, **kw)
  assert a == niah.example(variant, index=11, **kw)
  assert a != niah.example(variant, index=12, **kw)
  assert a != niah.example(variant, index=11, **{**kw, "split": Split.TRAIN})
  assert a != niah.example(variant, index=11, **{**kw, "seed": 4})


@pytest.mark.parametrize("variant", list(Variant))
def test_niah_single_document(variant):
  ex = niah.example(variant, seed=0, split=Split.TRAIN, index=0, num_docs=1, doc_chars=400)
  assert len(ex.docs) == 1 and ex.gold == (0,)
  assert all(v in ex.docs[0] for v in ex.answers)
  _check_doc_ids(ex, 1, (1, 6))


@pytest.mark.parametrize("variant", [Variant.MULTIQUERY, Variant.MULTIKEY_2, Variant.MULTIKEY_3])
def test_niah_train_and_test_keys_and_values_are_disjoint(variant):
  seen = {}
  for split in Split:
    keys, values = set(), set()
    for index in range(200):
      ex = niah.example(variant, seed=0, split=split, index=index, num_docs=3, doc_chars=150)
      for doc in ex.docs:
        for _, k, v in _needles(doc):
          keys.add(k)
          values.add(v)
    # Distractor needles come from the requested split too.
    assert all(split_of(k) is split for k in keys) and all(split_of(v) is split for v in values)
    seen[split] = keys, values
  (train_k, train_v), (test_k, test_v) = seen[Split.TRAIN], seen[Split.TEST]
  assert len(train_k) >= 200 and len(test_k) >= 200
  assert not train_k & test_k and not train_v & test_v


def test_niah_shares_documents_when_there_are_fewer_documents_than_needles():
  ex = niah.example(Variant.MULTIVALUE, seed=0, split=Split.TRAIN, index=0, num_docs=2,
                    doc_chars=400)
  assert ex.gold == (0, 1)
  assert sum(len(_needles(d)) for d in ex.docs) == 4


def test_doc_ids_digits_and_capacity():
  rng = np.random.default_rng(0)
  ids = niah.draw_doc_ids(rng, 9, (1, 1))
  assert sorted(ids) == list(range(1, 10))
  with pytest.raises(ValueError):
    niah.draw_doc_ids(rng, 10, (1, 1))
  ids = niah.draw_doc_ids(rng, 600, (1, 3))
  assert len(set(ids)) == 600
  assert {len(str(i)) for i in ids} == {1, 2, 3}
  ex = niah.example(Variant.SINGLE_1, seed=0, split=Split.TRAIN, index=0, num_docs=20,
                    doc_chars=100, id_digits=(2, 2))
  _check_doc_ids(ex, 20, (2, 2))


# ---------------------------------------------------------------------------- multi-hop

FIRST_HOP_PERSON = re.compile(r" by ([A-Z][a-z]+ [A-Z][a-z]+)\.")
THING = re.compile(r"[A-Z][a-z]+-[A-Z][a-z]+")
ASSIGN = re.compile(r"VAR ([A-Z]{5}) = (VAR [A-Z]{5}|\d{5})\.")


def _common_checks(ex: niah.Example, num_docs: int, hops: int, doc_chars: int):
  assert len(ex.hops) == hops and all(len(r) == 1 for r in ex.hops)
  assert ex.gold == tuple(sorted(r[0] for r in ex.hops))
  assert len(set(ex.gold)) == hops
  assert ex.answers == (ex.answer_text,)
  assert ex.answer_text in ex.docs[ex.hops[-1][0]]
  _check_doc_ids(ex, num_docs, (1, 6))
  assert all(len(d) <= doc_chars for d in ex.docs)


def test_bridge_two_hops_route_through_the_first_document():
  num_docs, doc_chars = 10, 220
  for index in range(20):
    ex = multihop.example(HopTask.BRIDGE, seed=1, split=Split.TRAIN, index=index,
                          num_docs=num_docs, doc_chars=doc_chars)
    assert ex.task == "bridge"
    _common_checks(ex, num_docs, 2, doc_chars)
    a, b = (ex.docs[r[0]] for r in ex.hops)
    (x,) = THING.findall(ex.question)
    (bridge,) = FIRST_HOP_PERSON.findall(a)
    assert x in a and x not in b
    # The bridge entity links A to B but is not in the question, and nowhere else.
    assert bridge not in ex.question and bridge in b
    assert [d for d, doc in enumerate(ex.docs) if bridge in doc] == sorted([ex.hops[0][0],
                                                                          ex.hops[1][0]])
    assert [d for d, doc in enumerate(ex.docs) if ex.answer_text in doc] == [ex.hops[1][0]]
    # Hard negatives: the queried thing also appears outside the gold documents.
    assert sum(x in doc for doc in ex.docs) == 2


@pytest.mark.parametrize("hops", [1, 2, 3, 4])
def test_chain_hops_follow_the_assignments(hops):
  num_docs, doc_chars = 12, 200
  for index in range(10):
    ex = multihop.example(HopTask.CHAIN, seed=2, split=Split.TEST, index=index, num_docs=num_docs,
                          hops=hops, doc_chars=doc_chars)
    assert ex.task == f"chain_{hops}"
    _common_checks(ex, num_docs, hops, doc_chars)
    assert all(len(ASSIGN.findall(doc)) == 1 for doc in ex.docs)  # one fact per document
    (wanted,) = re.findall(r"^What is the value of VAR ([A-Z]{5})\?$", ex.question)
    for r, (d,) in enumerate(ex.hops):
      ((name, rhs),) = ASSIGN.findall(ex.docs[d])
      assert name == wanted
      if r < hops - 1:
        assert rhs.startswith("VAR ")
        wanted = rhs[4:]  # the next round must find this variable's definition
      else:
        assert rhs == ex.answer_text


@pytest.mark.parametrize("task", list(HopTask))
def test_multihop_is_deterministic_split_pure_and_small_cases_work(task):
  kw = dict(seed=5, split=Split.TRAIN, num_docs=6, hops=2)
  a = multihop.example(task, index=0, **kw)
  assert a == multihop.example(task, index=0, **kw)
  assert a != multihop.example(task, index=1, **kw)
  train = {multihop.example(task, index=i, **kw).answer_text for i in range(100)}
  test = {multihop.example(task, index=i, **{**kw, "split": Split.TEST}).answer_text
          for i in range(100)}
  assert all(split_of(v) is Split.TRAIN for v in train)
  assert all(split_of(v) is Split.TEST for v in test)
  assert not train & test
  ex = multihop.example(task, seed=0, split=Split.TRAIN, index=0, num_docs=2, hops=2)
  assert ex.gold == (0, 1)


def test_multihop_rejects_impossible_requests():
  with pytest.raises(ValueError):
    multihop.example(HopTask.BRIDGE, seed=0, split=Split.TRAIN, index=0, num_docs=5, hops=3)
  with pytest.raises(ValueError):
    multihop.example(HopTask.CHAIN, seed=0, split=Split.TRAIN, index=0, num_docs=2, hops=3)
  assert len(multihop.example(HopTask.CHAIN, seed=0, split=Split.TRAIN, index=0, num_docs=1,
                              hops=1).docs) == 1


def test_example_is_frozen():
  ex = niah.example(Variant.SINGLE_1, seed=0, split=Split.TRAIN, index=0, num_docs=2,
                    doc_chars=100)
  with pytest.raises(AttributeError):
    ex.question = "x"  # type: ignore[misc]
  assert hash(ex) == hash(niah.example(Variant.SINGLE_1, seed=0, split=Split.TRAIN, index=0,
                                       num_docs=2, doc_chars=100))
