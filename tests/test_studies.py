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
