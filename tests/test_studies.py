"""Study harness: memory construction, sizes, BM25 retrieval and summary statistics."""

import numpy as np
import pytest

from msa_jax.data.tokenizer import ByteTokenizer
from msa_jax.studies import memory, run, stats
from msa_jax.studies.retrieval import BM25, words
from msa_jax.studies.sizes import format_size, parse_size

TOK = ByteTokenizer()
TASKS = ["niah_single_2", "niah_multikey_1", "niah_single_3"]


def _build(size, per_task=2, tasks=TASKS):
  return memory.build(tasks, per_task, size, doc_chars=160, docs_per_example=3, seed=0)


@pytest.mark.parametrize("text,n", [("16K", 16_000), ("1M", 1_000_000), ("100M", 100_000_000),
                                    ("2.5k", 2_500), ("300", 300)])
def test_sizes_parse_and_format(text, n):
  assert parse_size(text) == n
  assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("bad", ["", "M", "ten", "-1K"])
def test_bad_sizes_are_rejected(bad):
  with pytest.raises(ValueError):
    parse_size(bad)


def test_memory_is_deterministic_and_ids_are_positions():
  a, b = _build(20_000), _build(20_000)
  assert a == b
  assert len(a) == 1 and len(a[0].questions) == 6
  tokens, lengths = a[0].rendered(TOK)
  assert tokens.shape[0] == len(a[0].texts) == lengths.size
  first = TOK.decode(tokens[7, :lengths[7]])
  assert first.startswith("<|im_start|>[7]. ") and first.endswith("[7]<|im_end|>")


def test_memory_reaches_its_size_and_every_answer_is_in_its_gold_documents():
  (mem,) = _build(40_000)
  n = mem.num_tokens(TOK)
  assert abs(n - 40_000) <= 0.02 * 40_000 + 3 * 220, n  # ids have 1-5 digits: about the size
  for q in mem.questions:
    text = " ".join(mem.texts[i] for i in q.gold)
    assert all(a in text for a in q.answers)
    assert q.hops == (q.gold,)


def test_small_memories_spread_the_same_questions_over_several_memories():
  small, large = _build(4_000), _build(40_000)
  assert len(small) > 1
  asked = lambda ms: sorted((q.task, q.question) for m in ms for q in m.questions)  # noqa: E731
  assert asked(small) == asked(large)
  for m in small:
    assert m.num_tokens(TOK) <= 1.02 * 4_000 + 3 * 220
    for q in m.questions:
      assert all(a in " ".join(m.texts[i] for i in q.gold) for a in q.answers)


def test_multi_hop_memories_keep_the_hops():
  (mem,) = _build(20_000, tasks=["bridge", "chain_3"])
  for q in mem.questions:
    assert len(q.hops) == (2 if "bridge" in q.task else 3) or q.task.startswith("chain")
    assert set(q.gold) <= {x for h in q.hops for x in h}


def test_bm25_finds_the_needle_by_its_key_and_excludes():
  # The key is a rare term; RULER's question boilerplate ("provided text") can outrank it when a
  # haystack document uses the word, so the needle is in the top few rather than always first.
  (mem,) = _build(20_000, tasks=["niah_single_2"], per_task=3)
  index = BM25(mem.texts)
  for q in mem.questions:
    top = index.top(q.question, 3)
    assert q.gold[0] in top
    assert q.gold[0] not in index.top(q.question, 3, exclude=[q.gold[0]])
  assert words("What is the magic uuid for evasive-consul? 3f2a-9b") == [
      "what", "is", "the", "magic", "uuid", "for", "evasive-consul", "3f2a-9b"]


def test_iterative_bm25_reaches_the_second_hop_of_a_bridge():
  (mem,) = _build(20_000, tasks=["bridge"], per_task=6)
  index = BM25(mem.texts)
  found = [set(q.hops[1]) <= set(index.iterative(q.question, mem.texts, 1, 2))
           for q in mem.questions]
  # Against plain BM25 with as many documents: the second query (question + hop-1 text) is what
  # finds the bridge entity's document.
  plain = [set(q.hops[1]) <= set(index.top(q.question, 2)) for q in mem.questions]
  assert sum(found) > sum(plain)


def test_bootstrap_interval_matches_the_normal_approximation_on_a_large_sample():
  x = np.random.default_rng(0).random(4000) < 0.3
  lo, hi = stats.bootstrap_ci(x)
  half = 1.96 * np.sqrt(x.mean() * (1 - x.mean()) / x.size)
  assert abs(lo - (x.mean() - half)) < 0.004 and abs(hi - (x.mean() + half)) < 0.004
  assert stats.bootstrap_ci([1.0, 1.0]) == (1.0, 1.0)
  with pytest.raises(ValueError):
    stats.bootstrap_ci([])


def test_string_match_all_is_rulers_metric():
  assert stats.string_match_all("The values are 12 and 34.", ["12", "34"]) == 1.0
  assert stats.string_match_all("only 12", ["12", "34"]) == 0.5
  assert stats.string_match_all("ABC", ["abc"]) == 1.0


def test_exact_match_does_not_credit_extra_values():
  assert stats.exact_match(" 12 and 34\n", "12 and 34") == 1.0
  # RULER's metric credits an answer that lists every value it saw; the exact rate does not.
  assert stats.string_match_all("56, 12 and 34", ["12", "34"]) == 1.0
  assert stats.exact_match("56, 12 and 34", "12 and 34") == 0.0


def test_summarize_groups_by_task():
  o = [run.Outcome("a", 1.0, 1.0, (1.0,), 2, 0.1, "x"), run.Outcome("a", 0.0, 0.5, (0.0,), 2, 0.3, "y"),
       run.Outcome("b", 1.0, float("nan"), (1.0, 0.0), 1, 0.2, "z")]
  s = run.summarize(o)
  assert s["a"]["accuracy"] == 0.5 and s["a"]["recall"] == 0.75 and s["a"]["latency_s"] == 0.2
  assert s["b"]["recall"] is None and s["b"]["hop_recall"] == [1.0, 0.0]
  assert s["all"]["n"] == 3 and s["all"]["hop_recall"] == [2 / 3, 0.0]


# --- RULER-faithful memories --------------------------------------------------------------------

ALL_NIAH = [f"niah_{v}" for v in ("single_1", "single_2", "single_3", "multikey_1", "multikey_2",
                                  "multikey_3", "multivalue", "multiquery")]
NEEDLE = "special magic"


def _faithful(size, tasks=ALL_NIAH, per_task=2, **kw):
  return memory.build(tasks, per_task, size, doc_chars=160, docs_per_example=3, seed=0, **kw)


def test_the_builder_refuses_a_memory_where_an_asked_key_leaves_its_gold_documents():
  (mem,) = _faithful(8_000, tasks=["niah_single_2"], per_task=1)
  memory.check_unambiguous(mem)
  q = mem.questions[0]
  stray = next(i for i in range(len(mem.texts)) if i not in q.gold)
  texts = list(mem.texts)
  texts[stray] += f" Another one for {q.keys[0]} is: 1234567."
  with pytest.raises(memory.AmbiguousMemoryError, match=rf"{q.keys[0]}.*documents \[{stray}\]"):
    memory.check_unambiguous(memory.Memory(tuple(texts), mem.questions, mem.haystack))


def test_build_raises_when_the_haystack_would_repeat_an_asked_key(monkeypatch):
  from msa_jax.data import niah
  real = niah.haystack_documents

  def leaky(*args, protected_keys=(), **kw):  # a haystack that ignores its protection
    docs = real(*args, protected_keys=protected_keys, **kw)
    return [docs[0] + f" {protected_keys[0]}."] + docs[1:] if protected_keys else docs

  monkeypatch.setattr(niah, "haystack_documents", leaky)
  with pytest.raises(memory.AmbiguousMemoryError, match="also appears in documents"):
    _faithful(8_000, tasks=["niah_single_2"], per_task=1)


@pytest.mark.parametrize("task", ["niah_single_1", "niah_single_2", "niah_single_3"])
def test_single_needle_memories_hold_no_needle_beyond_the_asked_ones(task):
  mems = _faithful(60_000, tasks=[task], per_task=3)
  for m in mems:
    assert sum(t.count(NEEDLE) for t in m.texts) == len(m.questions)
    for q in m.questions:
      assert sum(NEEDLE in m.texts[i] for i in q.gold) == 1
  assert mems[0].haystack == ("noise" if task == "niah_single_1" else "essay")


@pytest.mark.parametrize("task", ["niah_multikey_2", "niah_multikey_3"])
def test_multi_key_haystacks_of_distractor_needles_never_hold_an_asked_key(task):
  (m,) = _faithful(60_000, tasks=[task], per_task=3)
  distractors = [t for i, t in enumerate(m.texts)
                 if not any(i in q.gold for q in m.questions)]
  assert sum(t.count(NEEDLE) for t in distractors) > 300  # a haystack of needles ...
  asked = [k for q in m.questions for k in q.keys] + [a for q in m.questions for a in q.answers]
  assert not any(k in t for t in distractors for k in asked)  # ... none of them asked


def test_variants_with_one_kind_of_haystack_share_memories_and_keys_stay_distinct():
  mems = _faithful(40_000)
  assert sorted(m.haystack for m in mems) == ["essay", "needles (uuids/uuids)",
                                              "needles (words/numbers)", "noise"]
  keys = [k for m in mems for q in m.questions for k in q.keys]
  assert len(keys) == len(set(keys))
  asked = sorted((q.task, q.question) for m in mems for q in m.questions)
  assert len(asked) == 16 and asked == sorted(
      (q.task, q.question) for m in _faithful(200_000) for q in m.questions)


def test_the_filler_needles_setting_is_the_harder_one_and_stays_unambiguous():
  (m,) = _faithful(60_000, distractors=memory.Distractors.FILLER_NEEDLES)
  asked_needles = sum(len(q.answers) for q in m.questions)
  assert sum(t.count(NEEDLE) for t in m.texts) > 5 * asked_needles
  memory.check_unambiguous(m)
  assert m.haystack == "filler examples"


def test_an_essay_haystack_of_the_users_text_replaces_the_generated_prose():
  import pathlib
  prose = memory.load_essay(pathlib.Path(__file__).parent / "data" / "prose")
  assert len(prose) > 50 and not any(NEEDLE in s.lower() for s in prose)
  (m,) = [m for m in _faithful(30_000, tasks=["niah_single_2"], per_task=2, essay=prose)]
  from msa_jax.data import text
  stream = " ".join(prose + prose)  # the haystack runs through the sentences, round and round
  for i, t in enumerate(m.texts):
    # Documents join whole sentences with spaces: each piece is a needle or the user's text.
    assert all(s in stream or NEEDLE in s for s in text.split_sentences(t)), (i, t)
  with pytest.raises(ValueError, match="no .txt files"):
    memory.load_essay(pathlib.Path(__file__).parent)


def test_filler_examples_that_would_repeat_an_asked_key_are_skipped(monkeypatch):
  import dataclasses
  from msa_jax.data import synthetic
  kw = dict(tasks=["niah_single_2"], per_task=1, distractors=memory.Distractors.FILLER_NEEDLES)
  (clean,) = _faithful(20_000, **kw)
  key = clean.questions[0].keys[0]
  real = synthetic.example

  def colliding(task, *, index, **rest):  # every other filler example reuses the asked key
    ex = real(task, index=index, **rest)
    if index >= 1_000_000 and index % 2 == 0:
      ex = dataclasses.replace(ex, docs=(ex.docs[0] + f" Also {key}.",) + ex.docs[1:])
    return ex

  monkeypatch.setattr(synthetic, "example", colliding)
  (m,) = _faithful(20_000, **kw)
  memory.check_unambiguous(m)
  assert sum(key in t for t in m.texts) == 1


def test_the_settings_plot_draws_several_runs(tmp_path):
  from msa_jax.studies import plots
  def run_(acc):
    s = {"accuracy": acc, "recall_at_1": acc}
    return {"tasks": ["niah_single_1", "niah_multikey_2"], "sizes": [
        {"tokens_per_memory": n, "msa": {"all": s, "niah_single_1": s, "niah_multikey_2": s},
         "rag": {"rag@1": {"all": s}}} for n in (16_000, 1_000_000)]}
  plots.settings({"a": run_(0.5), "b": run_(0.9)}, str(tmp_path / "p.png"))
  assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
