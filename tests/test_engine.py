"""The three inference stages: official parity, consistency with the training path, tiered content."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import load_npz
from msa_jax import forward as fw
from msa_jax.config import ModelConfig, MSAConfig, RoutingScore
from msa_jax.engine import decode, encode, prefill
from msa_jax.engine.sampling import Sampling, sample
from msa_jax.interop import hf
from msa_jax.memory.bank import BankSpec, MemoryBank
from msa_jax.memory.index import DeviceContent, HostContent, RoutingIndex
from msa_jax.nn.model import from_params

ATOL = 1e-5
REQUEST = ("input_ids", "doc_ids", "attention_mask", "position_ids")


class Engine:
  """A model, a bank built from documents, and the stage functions bound to them."""

  def __init__(self, model, tokens, lengths, template=None, host=False):
    self.model = model
    self.graphdef, self.state = nnx.split(model)
    self.enc = encode.encode_documents(model, tokens, lengths)
    self.template = None if template is None else encode.encode_template(model, template)
    self.bank = MemoryBank.from_encoded(BankSpec.for_model(model.cfg), self.enc,
                                        template=self.template)
    self.index = RoutingIndex.from_bank(self.bank)
    self.content = HostContent(self.bank) if host else DeviceContent.from_bank(self.bank)
    self.tkv = prefill.TemplateKV.from_template(self.template, model)
    self.ids = jax.device_put(self.bank.doc_ids)

  def prefill(self, request, max_new_tokens=4):
    return prefill.prefill_jit(self.graphdef, self.state, self.index, self.content, self.ids,
                               self.tkv, request, max_new_tokens=max_new_tokens,
                               with_doc_scores=True)


# --- the official inference fixture -----------------------------------------------------------

@pytest.fixture(scope="module")
def official_inference(official_model):
  return from_params(*official_model), load_npz("fixture_inference.npz")


@pytest.fixture(scope="module", params=["device", "host"])
def official_engine(request, official_inference):
  model, ref = official_inference
  engine = Engine(model, ref["memory_doc_tokens"], ref["memory_doc_lens_tokens"],
                  template=ref["template_head_ids"], host=request.param == "host")
  req = prefill.Request.from_arrays({k: ref["stage2_" + k] for k in REQUEST})
  out, state = engine.prefill(req)
  return engine, ref, out, state


def test_bank_contents_match_the_official_stage1(official_engine):
  engine, ref, _, _ = official_engine
  for l in (2, 3):
    for ours, name in ((engine.bank.keys, "k"), (engine.bank.values, "v"),
                       (engine.bank.routing_keys, "rk")):
      theirs = ref[f"memory_{name}_L{l}"][0].transpose(1, 0, 2)  # [K, C, H] -> [C, K, H]
      np.testing.assert_allclose(ours[l], theirs, atol=ATOL, err_msg=f"{name} L{l}")
  for l in range(4):
    np.testing.assert_allclose(engine.template.keys[l],
                               ref[f"template_prefix_k_L{l}"][0].transpose(1, 0, 2), atol=ATOL)
    np.testing.assert_allclose(engine.template.values[l],
                               ref[f"template_prefix_v_L{l}"][0].transpose(1, 0, 2), atol=ATOL)
  np.testing.assert_array_equal(engine.bank.chunk_doc + 1, ref["memory_pool_ids"])


def test_stage2_selects_the_official_documents(official_engine):
  _, ref, out, _ = official_engine
  for l, routed in out.routed.items():
    np.testing.assert_array_equal(routed.doc_ids, ref[f"stage2_selected_doc_ids_L{l}"])
    np.testing.assert_allclose(routed.doc_scores, ref[f"stage2_doc_scores_L{l}"][:, 1:], atol=1e-6)
    np.testing.assert_allclose(routed.scores, ref[f"stage2_topk_scores_L{l}"], atol=1e-6)


def test_stage2_logits_match_on_valid_tokens(official_engine):
  _, ref, out, _ = official_engine
  valid = ref["stage2_attention_mask"].astype(bool)
  np.testing.assert_allclose(np.asarray(out.logits)[valid], ref["stage2_logits"][valid], atol=ATOL)


def test_greedy_decode_gives_the_official_tokens(official_engine):
  engine, ref, _, state = official_engine
  gen = decode.generate(engine.graphdef, engine.state, state, 4)
  np.testing.assert_array_equal(gen.tokens, ref["decode_tokens"])
  np.testing.assert_allclose(gen.logits, ref["decode_logits"], atol=ATOL)


# --- consistency with the training path on random models and documents ------------------------

def random_model(decouple: bool, seed: int = 0, kv_heads: int = 2):
  cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                    num_heads=4, num_kv_heads=kv_heads, head_dim=8, rope_theta=10000.0,
                    msa=MSAConfig(top_k_docs=2, pooling_size=4, router_layers=(1, 2),
                                  decouple_router=decouple,
                                  routing_score=RoutingScore.COSINE if decouple
                                  else RoutingScore.SCALED_COSINE))
  params = hf.init_params(cfg, seed)
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.3, np.shape(p)), jnp.float32)
                        if np.ndim(p) >= 1 else p, params)
  return from_params(cfg, params)


LENGTHS = [1, 3, 4, 5, 9, 2]  # partial chunks, one-token documents, P and P+1
TEMPLATE = np.array([7, 8, 9])


def random_docs(seed=1):
  rng = np.random.default_rng(seed)
  tokens = np.full((len(LENGTHS), max(LENGTHS)), -1)
  for i, n in enumerate(LENGTHS):
    tokens[i, :n] = rng.integers(1, 64, n)
  return tokens, np.asarray(LENGTHS)


def training_batch(docs, lengths, queries, answers, k):
  """Rows [template ; documents 1..M ; query (role 0) ; answer (role -1)], right padded."""
  rows = []
  for q, a in zip(queries, answers):
    ids, roles_, pos = list(TEMPLATE), [-2] * 3, [0, 1, 2]
    for d, n in enumerate(lengths):
      ids += list(docs[d, :n]); roles_ += [d + 1] * n; pos += list(range(n))
    start = len(TEMPLATE) + k
    ids += list(q) + list(a); roles_ += [0] * len(q) + [-1] * len(a)
    pos += list(range(start, start + len(q) + len(a)))
    rows.append((ids, roles_, pos))
  t = max(len(r[0]) for r in rows)
  out = {n: np.zeros((len(rows), t), np.int64) for n in REQUEST}
  for b, (ids, roles_, pos) in enumerate(rows):
    n = len(ids)
    out["input_ids"][b, :n], out["doc_ids"][b, :n], out["position_ids"][b, :n] = ids, roles_, pos
    out["attention_mask"][b, :n] = 1
  return out


def request_batch(queries, answers, k):
  """The same active tokens as a left-padded stage-2 request."""
  t = max(len(q) + len(a) for q, a in zip(queries, answers))
  out = {n: np.zeros((len(queries), t), np.int64) for n in REQUEST}
  for b, (q, a) in enumerate(zip(queries, answers)):
    n = len(q) + len(a)
    s = t - n
    out["input_ids"][b, s:] = list(q) + list(a)
    out["doc_ids"][b, s:] = [0] * len(q) + [-1] * len(a)
    out["position_ids"][b, s:] = np.arange(len(TEMPLATE) + k, len(TEMPLATE) + k + n)
    out["attention_mask"][b, s:] = 1
  return out


QUERIES = [[5, 6, 7, 8, 9], [10, 11, 12]]
ANSWERS = [[13, 14], [15, 16, 17, 18]]


@pytest.fixture(scope="module", params=[True, False], ids=["decoupled", "shared-qk"])
def consistency(request):
  model = random_model(request.param)
  docs, lengths = random_docs()
  engine = Engine(model, docs, lengths, template=TEMPLATE)
  k = model.cfg.msa.top_k_docs
  train = training_batch(docs, lengths, QUERIES, ANSWERS, k)
  train_out = fw.run(model, fw.Batch.from_arrays(train))
  req = request_batch(QUERIES, ANSWERS, k)
  out, state = engine.prefill(prefill.Request.from_arrays(req), max_new_tokens=5)
  return model, engine, train, train_out, req, out, state


def test_stage2_selects_what_the_training_path_selects(consistency):
  _, _, _, train_out, _, out, _ = consistency
  for l, routed in out.routed.items():
    np.testing.assert_array_equal(routed.rows + 1 * (routed.rows >= 0), train_out.selected[l])


def test_stage2_logits_equal_training_path_logits(consistency):
  _, _, train, train_out, req, out, _ = consistency
  for b in range(len(QUERIES)):
    n = len(QUERIES[b]) + len(ANSWERS[b])
    end = int(train["attention_mask"][b].sum())
    np.testing.assert_allclose(np.asarray(out.logits)[b, -n:],
                               np.asarray(train_out.logits)[b, end - n:end], atol=ATOL)


def test_decoding_equals_rerunning_the_training_path_on_the_extended_sequence(consistency):
  model, engine, _, _, _, _, state = consistency
  steps = 5
  gen = decode.generate(engine.graphdef, engine.state, state, steps)
  k = model.cfg.msa.top_k_docs
  docs, lengths = random_docs()
  answers = [list(a) + np.asarray(gen.tokens[b, :steps - 1]).tolist() for b, a in enumerate(ANSWERS)]
  train = training_batch(docs, lengths, QUERIES, answers, k)
  train_out = fw.run(model, fw.Batch.from_arrays(train))
  for b in range(len(QUERIES)):
    end = int(train["attention_mask"][b].sum())
    # Logits at the last `steps` active positions drew tokens 0..steps-1.
    np.testing.assert_allclose(np.asarray(gen.logits)[:, b],
                               np.asarray(train_out.logits)[b, end - steps:end], atol=ATOL)
    np.testing.assert_array_equal(gen.tokens[b],
                                  np.argmax(np.asarray(train_out.logits)[b, end - steps:end], -1))


# --- tiered content: host store, explicit transfers, bytes moved --------------------------------

def test_routed_request_makes_no_implicit_transfers_and_moves_only_selected_chunks():
  model = random_model(True)
  docs, lengths = random_docs()
  engine = Engine(model, docs, lengths, template=TEMPLATE, host=True)
  k = model.cfg.msa.top_k_docs
  req = jax.device_put(prefill.Request.from_arrays(request_batch(QUERIES, ANSWERS, k)))
  engine.prefill(req)  # compile outside the guard
  before = engine.content.bytes_moved
  with jax.transfer_guard("disallow"):
    out, state = engine.prefill(req)
    out.logits.block_until_ready()
  moved = engine.content.bytes_moved - before
  cfg = model.cfg
  chunk_bytes = 2 * cfg.num_kv_heads * cfg.head_dim * 4  # K̄ and V̄, float32
  expected = sum(int(engine.bank.chunk_count[r]) for routed in out.routed.values()
                 for r in np.asarray(routed.rows).ravel() if r >= 0) * chunk_bytes
  assert moved == expected > 0
  assert moved < engine.bank.num_chunks * chunk_bytes * len(out.routed) * len(QUERIES)
  with pytest.raises(Exception, match="[Dd]isallowed"):  # the guard is live: numpy input fails
    with jax.transfer_guard("disallow"):
      engine.prefill(prefill.Request.from_arrays(request_batch(QUERIES, ANSWERS, k)).replace(
          input_ids=np.asarray(req.input_ids)))


def test_deleted_documents_are_never_selected():
  model = random_model(True)
  docs, lengths = random_docs()
  engine = Engine(model, docs, lengths, template=TEMPLATE)
  req = prefill.Request.from_arrays(request_batch(QUERIES, ANSWERS, model.cfg.msa.top_k_docs))
  out, _ = engine.prefill(req)
  winner = int(out.routed[2].rows[0, 0])
  engine.bank.live[winner] = False
  engine.index = RoutingIndex.from_bank(engine.bank)
  out2, _ = engine.prefill(req)
  for routed in out2.routed.values():
    assert winner not in np.asarray(routed.rows).tolist()
    assert np.isneginf(np.asarray(routed.doc_scores)[:, winner]).all()


def test_fewer_documents_than_k_pads_with_minus_one():
  model = random_model(True)
  docs, lengths = random_docs()
  engine = Engine(model, docs[:1], lengths[:1])
  req = prefill.Request.from_arrays(request_batch(QUERIES, ANSWERS, 2))
  out, _ = engine.prefill(req)
  for routed in out.routed.values():
    assert np.asarray(routed.rows).tolist() == [[0, -1], [0, -1]]
    assert np.asarray(routed.doc_ids).tolist() == [[0, -1], [0, -1]]


# --- sampling and stop tokens -------------------------------------------------------------------

def test_sampling_greedy_temperature_and_top_p():
  logits = jnp.asarray([[0.0, 3.0, 1.0, 3.0], [5.0, 0.0, 0.0, 0.0]])
  key = jax.random.key(0)
  assert sample(logits, key, Sampling()).tolist() == [1, 0]  # ties to the lower id
  # A tiny nucleus keeps only the best token(s): with top_p -> 0 sampling is greedy-like.
  draws = {tuple(sample(logits, jax.random.key(s), Sampling(1.0, 1e-6)).tolist()) for s in range(20)}
  assert draws <= {(1, 0), (3, 0)}
  hot = [sample(logits, jax.random.key(s), Sampling(temperature=5.0)).tolist()[1] for s in range(50)]
  assert len(set(hot)) > 1  # a high temperature explores
  with pytest.raises(ValueError, match="top_p"):
    Sampling(top_p=0.0)


def test_generation_stops_per_row_at_a_stop_token(official_engine):
  engine, ref, _, state = official_engine
  # Row 0's second token is 18: stop there; row 1 runs on.
  gen = decode.generate(engine.graphdef, engine.state, state, 4, stop_tokens=(18,))
  assert np.asarray(gen.tokens).tolist() == [[32, 18, -1, -1], [229, 61, 63, 174]]


# --- bad input -----------------------------------------------------------------------------------

def test_request_with_document_tokens_is_rejected():
  req = request_batch(QUERIES, ANSWERS, 2)
  req["doc_ids"][0, -1] = 3
  with pytest.raises(prefill.RequestError, match="documents live in the bank"):
    prefill.Request.from_arrays(req)


@pytest.mark.parametrize("lengths,message", [([3, 0], r"documents \[1\] are empty"),
                                             ([3, 9], "exceeds the token array width")])
def test_bad_documents_are_rejected(official_inference, lengths, message):
  model, _ = official_inference
  with pytest.raises(encode.EncodeError, match=message):
    encode.encode_documents(model, np.ones((2, 4), np.int64), np.asarray(lengths))


def test_out_of_vocabulary_tokens_are_rejected(official_inference):
  model, _ = official_inference
  with pytest.raises(encode.EncodeError, match="outside 0..319"):
    encode.encode_documents(model, np.array([[1, 400]]), np.array([2]))


def test_encoding_compiles_one_shape_per_length_bucket(official_inference):
  model, _ = official_inference
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 60, 40)
  tokens = rng.integers(0, 320, (40, 60))
  encode._encode_batch.clear_cache()
  enc = encode.encode_documents(model, tokens, lengths, batch_tokens=256)
  buckets = {encode.bucket_length(int(n), 4) for n in lengths}
  assert encode._encode_batch._cache_size() == len(buckets) <= 5
  # Batching does not change any document's encoding.
  one = encode.encode_documents(model, tokens[7:8], lengths[7:8])
  off = int(np.sum(-(-lengths[:7] // 4)))
  np.testing.assert_allclose(enc.keys[2][off:off + len(one.keys[2])], one.keys[2], atol=1e-6)


# --- the host-driven path with a device page cache ----------------------------------------------

def test_paged_prefill_equals_the_single_jit_path_and_reuses_pages(official_engine):
  from msa_jax.memory.paging import PageCache
  engine, ref, out, _ = official_engine
  req = jax.device_put(prefill.Request.from_arrays({k: ref["stage2_" + k] for k in REQUEST}))
  pages = PageCache(engine.bank, slots=8)
  paged, state = prefill.route_and_prefill_paged(engine.model, engine.index, pages, engine.ids,
                                                 engine.tkv, req, 4)
  np.testing.assert_allclose(paged.logits, out.logits, atol=1e-6)
  for l in out.routed:
    np.testing.assert_array_equal(paged.routed[l].rows, out.routed[l].rows)
  first = pages.bytes_moved
  layer_rows = {2: {0, 1, 4}, 3: {0, 3}}  # official selections, by layer
  page_bytes = 2 * pages.max_chunks * 2 * 16 * 4
  assert first == sum(map(len, layer_rows.values())) * page_bytes
  with jax.transfer_guard("disallow"):  # the host-driven path transfers only explicitly
    again, _ = prefill.route_and_prefill_paged(engine.model, engine.index, pages, engine.ids,
                                               engine.tkv, req, 4)
  assert pages.bytes_moved == first and pages.hits == pages.misses == 5  # nothing moved again
  np.testing.assert_array_equal(again.logits, paged.logits)
  gen = decode.generate(engine.graphdef, engine.state, state, 4)
  np.testing.assert_array_equal(gen.tokens, ref["decode_tokens"])


def test_page_cache_evicts_least_recently_used_pages_not_needed_now(official_engine):
  from msa_jax.memory.paging import PageCache
  engine = official_engine[0]
  pages = PageCache(engine.bank, slots=3)
  pages.fetch(2, np.array([[0, 1]]))
  pages.fetch(2, np.array([[2, 0]]))  # 0 is fresh again; 1 is now the oldest
  pages.fetch(2, np.array([[3, -1]]))  # evicts 1
  assert set(pages._lru[2]) == {0, 2, 3}
  k, v, mask = pages.fetch(2, np.array([[3, 0]]))
  rows = [0, 3]  # ascending bank order
  cmax = pages.max_chunks
  for j, r in enumerate(rows):
    n = int(engine.bank.chunk_count[r])
    off = int(engine.bank.chunk_offset[r])
    np.testing.assert_array_equal(np.asarray(k)[0, j * cmax:j * cmax + n],
                                  engine.bank.keys[2][off:off + n])
    assert np.asarray(mask)[0, j * cmax:(j + 1) * cmax].sum() == n
  with pytest.raises(ValueError, match="needs 4 documents but the cache has 3"):
    pages.fetch(2, np.array([[0, 1], [2, 3]]))
