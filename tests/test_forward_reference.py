"""The training-path forward (SPEC §3-§7) against a complete float64 NumPy reference.

The reference below is written from SPEC.md with plain loops; it shares no code with msa_jax:
- Qwen3 blocks: x += o(attn(rms(x))); x += down(silu(gate(rms(x))) · up(rms(x))); q/k get a per-head
  RMSNorm before rotate-half RoPE at the given (document-wise) positions; GQA head h → kv head h//G.
- Who sees whom: document tokens attend causally within their own document; active tokens (0, -1,
  -2) causally among active tokens; padding nowhere. Router layers add, for active tokens, the
  pooled chunks (K̄ = mean of normed+rotated keys, V̄ = mean of values) of the top-k documents,
  each visible to active tokens after the chunk's first token.
- Routing: decoupled → qᴿ = router_q_proj(rms(x)), K̄ᴿ = mean router_k_proj(rms(x)), cosine;
  coupled → qᴿ = attention q (normed, rotated), K̄ᴿ = K̄, both L2-normalised, scale 1/√H.
  Reduce heads → routing tokens → chunks per document; top-k with ties to the lower id.
- Losses: shifted LM CE (-100 ignored), answer CE on the selected rows, InfoNCE on router layers
  ≥ L/2 over present documents with τ clamped to [1e-3, 0.5], averaged over samples with documents.
"""

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from flax import nnx

from msa_jax import forward as fw
from msa_jax.config import ChunkReduce, HeadReduce, ModelConfig, MSAConfig, QueryReduce, RoutingScore
from msa_jax.nn.model import MSAForCausalLM, from_params

LOGITS_ATOL = 5e-5  # 3 float32 layers with O(1) weights vs float64 (logits up to ~40)
LOGITS_RTOL = 1e-5
SCORES_ATOL = 1e-6  # cosine document scores after float32 layers
LOSS_RTOL = 1e-5
SELECTION_MARGIN = 1e-3  # the reference's k-th / (k+1)-th scores must differ by more than this
FD_RTOL = 2e-3  # float32 central differences (observed ~2e-4)
FD_EPS = 1e-2

TOP_K = 3
P = 4
NUM_LAYERS = 3
ROUTER_LAYERS = (0, 2)  # layer 0 routes but is not an aux-loss layer (0 < L/2); layer 2 is both
VOCAB = 128
DOC_VOCAB = 96  # document tokens use ids < 96, each at most once in the batch; others ids >= 96

CASES = {
    # name: (decouple_router, num_kv_heads (4 query heads), head, query, chunk reduce, tied)
    "decoupled_G1_paper": (True, 4, HeadReduce.MEAN, QueryReduce.MAX, ChunkReduce.MAX, False),
    "decoupled_G2": (True, 2, HeadReduce.MAX, QueryReduce.LAST, ChunkReduce.MEAN, True),
    "coupled_G1": (False, 4, HeadReduce.MAX, QueryReduce.MEAN, ChunkReduce.MAX, False),
    "coupled_G2": (False, 2, HeadReduce.MEAN, QueryReduce.MAX, ChunkReduce.MEAN, True),
}


def make_config(name: str) -> ModelConfig:
  decouple, kv, head, query, chunk, tied = CASES[name]
  return ModelConfig(
      vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_layers=NUM_LAYERS, num_heads=4,
      num_kv_heads=kv, head_dim=8, rms_norm_eps=1e-6, rope_theta=10_000.0,
      tie_word_embeddings=tied,
      msa=MSAConfig(top_k_docs=TOP_K, pooling_size=P, router_layers=ROUTER_LAYERS,
                    decouple_router=decouple, head_reduce=head, query_reduce=query,
                    chunk_reduce=chunk,
                    routing_score=RoutingScore.COSINE if decouple else RoutingScore.SCALED_COSINE,
                    aux_temperature=0.2, lm_weight=0.7, aux_weight=0.3, answer_weight=0.5))


def random_params(cfg: ModelConfig, seed: int):
  """Every parameter of the model (the tree of hf.init_params) with O(1) random values: kernels
  N(0, 1/fan_in), embeddings N(0, 1), every RMSNorm scale U(0.5, 1.5)."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    shape = np.shape(leaf)
    if name == "kernel":
      value = rng.standard_normal(shape) / np.sqrt(shape[0])
    elif name == "embedding":
      value = rng.standard_normal(shape)
    elif name == "scale":
      value = rng.uniform(0.5, 1.5, shape)
    else:  # the temperature buffer
      value = cfg.msa.aux_temperature
    return jnp.asarray(value, jnp.float32)

  # The structure of hf.init_params(cfg, seed) without spending time on its random values.
  structure = nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: MSAForCausalLM(cfg, rngs=nnx.Rngs(0)))))
  return jax.tree_util.tree_map_with_path(fill, structure)


# --- the batch ---------------------------------------------------------------------------------

T = 40
# Per row, a list of segments (role, length); role 'pad' = padding; documents are 'doc'
# (numbered 1..n in order).
ROWS = [
    # template, docs of lengths 1, 3, 4, 5, 9 (P = 4), question, answer, follow-up question, answer
    [("tpl", 3), ("doc", 1), ("doc", 3), ("doc", 4), ("doc", 5), ("doc", 9), ("q", 3), ("a", 3),
     ("q", 2), ("a", 2), ("pad", 5)],
    # left padding, docs of lengths 4, 5, 1, 7 (one more than k)
    [("pad", 15), ("tpl", 2), ("doc", 4), ("doc", 5), ("doc", 1), ("doc", 7), ("q", 2), ("a", 4)],
    # no template, two documents (fewer than k)
    [("doc", 2), ("doc", 6), ("q", 3), ("a", 5), ("pad", 24)],
    # no routing token at all: nothing is selected, every document score is -inf
    [("pad", 25), ("tpl", 2), ("doc", 3), ("doc", 4), ("a", 6)],
]
AUX_LABELS = np.array([[0, 1, 0, 0, 1], [1, 0, 0, 1, -1], [0, 1, -1, -1, -1], [1, 0, -1, -1, -1]])
TRAIN_QA_SAMPLES = np.array([1, 0, 1, 1])
ROLE = {"tpl": -2, "q": 0, "a": -1}


def make_batch(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  doc_tokens = iter(rng.permutation(DOC_VOCAB))
  arrays = {k: np.zeros((len(ROWS), T), np.int64) for k in
            ("input_ids", "doc_ids", "attention_mask", "position_ids")}
  for b, segments in enumerate(ROWS):
    assert sum(n for _, n in segments) == T
    t, doc, tpl_len = 0, 0, 0
    active_pos = None
    for role, n in segments:
      sl = slice(t, t + n)
      if role == "pad":
        arrays["input_ids"][b, sl] = VOCAB - 1
        arrays["doc_ids"][b, sl] = 0
      elif role == "doc":
        doc += 1
        arrays["input_ids"][b, sl] = [next(doc_tokens) for _ in range(n)]
        arrays["doc_ids"][b, sl] = doc
        arrays["position_ids"][b, sl] = np.arange(n)  # document-wise positions
        arrays["attention_mask"][b, sl] = 1
      else:
        arrays["input_ids"][b, sl] = rng.integers(DOC_VOCAB, VOCAB - 1, n)
        arrays["doc_ids"][b, sl] = ROLE[role]
        arrays["attention_mask"][b, sl] = 1
        if role == "tpl":
          arrays["position_ids"][b, sl] = np.arange(tpl_len, tpl_len + n)
          tpl_len += n
        else:
          active_pos = tpl_len + TOP_K if active_pos is None else active_pos
          arrays["position_ids"][b, sl] = np.arange(active_pos, active_pos + n)
          active_pos += n
      t += n
  # LM labels on answer tokens whose predecessor is an active token (so no document token's own
  # logits enter the loss: gradients reach documents only through memory).
  ids, d, valid = arrays["input_ids"], arrays["doc_ids"], arrays["attention_mask"].astype(bool)
  prev_active = np.pad(valid & (d < 1), [(0, 0), (1, 0)])[:, :-1]
  labels = np.where(valid & (d == -1) & prev_active, ids, -100)
  return dict(arrays, labels=labels, aux_labels=AUX_LABELS, answer_labels=labels,
              train_qa_samples=TRAIN_QA_SAMPLES)


# --- the float64 reference ---------------------------------------------------------------------

def rms(x, w, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def unit(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def rope(x, positions, theta):
  """x [T, N, H] rotated by positions [T] (rotate-half, inv_freq = θ^(-2i/H))."""
  h = x.shape[-1]
  half = h // 2
  inv_freq = theta ** (-2.0 * np.arange(half) / h)
  a = positions[:, None, None] * inv_freq  # T 1 H/2
  lo, hi = x[..., :half], x[..., half:]
  return np.concatenate([lo * np.cos(a) - hi * np.sin(a), hi * np.cos(a) + lo * np.sin(a)], -1)


def doc_chunks(doc_row, valid_row):
  """[(doc id, [token indices])] in sequence order; chunk j of a document = its tokens [jP, (j+1)P)."""
  chunks, seen = [], {}
  for t, (d, v) in enumerate(zip(doc_row, valid_row)):
    if v and d >= 1:
      if seen.get(d, 0) % P == 0:
        chunks.append((int(d), []))
      seen[d] = seen.get(d, 0) + 1
      chunks[-1][1].append(t)
  return chunks


def softmax_attend(q, keys, values):
  """q [H], keys/values [S, H] -> [H] with scale 1/√H (zeros when S = 0)."""
  if len(keys) == 0:
    return np.zeros_like(q)
  logits = keys @ q / np.sqrt(q.shape[-1])
  p = np.exp(logits - logits.max())
  return (p / p.sum()) @ values


def ref_route(cfg, rq, chunk_keys, chunks, query_tokens, num_slots):
  """Document scores [num_slots] and selected ids for one sample (SPEC §6)."""
  m = cfg.msa
  g = cfg.num_heads // cfg.num_kv_heads
  scores = np.full(num_slots, -np.inf)
  if not query_tokens or not chunks:
    return scores, []
  scale = 1.0 if m.routing_score is RoutingScore.COSINE else 1.0 / np.sqrt(cfg.head_dim)
  per_chunk = []
  for c in range(len(chunks)):
    per_token = []
    for t in query_tokens:
      heads = [scale * np.dot(unit(rq[t, n]), unit(chunk_keys[c][n // g])) for n in range(cfg.num_heads)]
      per_token.append(np.mean(heads) if m.head_reduce is HeadReduce.MEAN else np.max(heads))
    per_chunk.append({QueryReduce.MAX: max(per_token), QueryReduce.MEAN: np.mean(per_token),
                      QueryReduce.LAST: per_token[-1]}[m.query_reduce])
  for d in sorted({d for d, _ in chunks}):
    mine = [s for s, (dd, _) in zip(per_chunk, chunks) if dd == d]
    scores[d] = max(mine) if m.chunk_reduce is ChunkReduce.MAX else np.mean(mine)
  present = [d for d in range(num_slots) if np.isfinite(scores[d])]
  return scores, sorted(present, key=lambda d: (-scores[d], d))[:m.top_k_docs]


def ref_forward(cfg: ModelConfig, params, batch):
  """Logits [B, T, V], doc scores {layer: [B, M+1]}, selected {layer: [[ids]]} in float64."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  ids, doc, pos = batch["input_ids"], batch["doc_ids"], batch["position_ids"]
  valid = batch["attention_mask"].astype(bool)
  b_size, t_size = ids.shape
  n, kh, h, eps = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps
  g = n // kh
  num_slots = int(doc[valid].max()) + 1
  x = p["embed"]["embedding"][ids]
  scores, selected = {}, {}
  for i in range(cfg.num_layers):
    lp, at = p["layers"][i], p["layers"][i]["attn"]
    hid = rms(x, lp["input_norm"]["scale"], eps)
    out = np.zeros((b_size, t_size, n, h))
    router = i in cfg.msa.router_layers
    if router:
      scores[i], selected[i] = np.full((b_size, num_slots), -np.inf), []
    for b in range(b_size):
      q = rope(rms((hid[b] @ at["q_proj"]["kernel"]).reshape(t_size, n, h), at["q_norm"]["scale"], eps),
               pos[b].astype(np.float64), cfg.rope_theta)
      k = rope(rms((hid[b] @ at["k_proj"]["kernel"]).reshape(t_size, kh, h), at["k_norm"]["scale"], eps),
               pos[b].astype(np.float64), cfg.rope_theta)
      v = (hid[b] @ at["v_proj"]["kernel"]).reshape(t_size, kh, h)
      chunks, memory = doc_chunks(doc[b], valid[b]), []
      if router:
        pooled_k = [k[idx].mean(0) for _, idx in chunks]
        pooled_v = [v[idx].mean(0) for _, idx in chunks]
        if cfg.msa.decouple_router:
          rq = (hid[b] @ at["router_q_proj"]["kernel"]).reshape(t_size, n, h)
          rk_tok = (hid[b] @ at["router_k_proj"]["kernel"]).reshape(t_size, kh, h)
          rk = [rk_tok[idx].mean(0) for _, idx in chunks]
        else:
          rq, rk = q, pooled_k
        query_tokens = [t for t in range(t_size) if valid[b, t] and doc[b, t] == 0]
        scores[i][b], sel = ref_route(cfg, rq, rk, chunks, query_tokens, num_slots)
        selected[i].append(sel)
        memory = [(c, idx[0]) for c, (d, idx) in enumerate(chunks) if d in sel]
      for t in range(t_size):
        if not valid[b, t]:
          continue
        if doc[b, t] >= 1:
          toks = [j for j in range(t + 1) if valid[b, j] and doc[b, j] == doc[b, t]]
          mem = []
        else:
          toks = [j for j in range(t + 1) if valid[b, j] and doc[b, j] < 1]
          mem = [c for c, start in memory if start < t]
        for hh in range(n):
          keys = [pooled_k[c][hh // g] for c in mem] + [k[j, hh // g] for j in toks]
          values = [pooled_v[c][hh // g] for c in mem] + [v[j, hh // g] for j in toks]
          out[b, t, hh] = softmax_attend(q[t, hh], np.array(keys), np.array(values))
    x = x + out.reshape(b_size, t_size, n * h) @ at["o_proj"]["kernel"]
    hid = rms(x, lp["post_attn_norm"]["scale"], eps)
    gate = hid @ lp["mlp"]["gate_proj"]["kernel"]
    up = hid @ lp["mlp"]["up_proj"]["kernel"]
    x = x + (gate / (1 + np.exp(-gate)) * up) @ lp["mlp"]["down_proj"]["kernel"]  # silu(gate) · up
  x = rms(x, p["final_norm"]["scale"], eps)
  head = p["embed"]["embedding"].T if cfg.tie_word_embeddings else p["lm_head"]["kernel"]
  return x @ head, scores, selected


def log_softmax(z):
  z = z - z.max()
  return z - np.log(np.sum(np.exp(z)))


def ref_lm_loss(logits, labels, rows=None):
  total, count = 0.0, 0
  for b in range(logits.shape[0]):
    if rows is not None and not rows[b]:
      continue
    for t in range(logits.shape[1] - 1):
      if labels[b, t + 1] != -100:
        total -= log_softmax(logits[b, t])[labels[b, t + 1]]
        count += 1
  return total / max(count, 1)


def ref_losses(cfg, logits, scores, batch):
  m = cfg.msa
  lm = ref_lm_loss(logits, batch["labels"])
  ans = ref_lm_loss(logits, batch["answer_labels"], batch["train_qa_samples"] > 0)
  tau = min(max(float(m.aux_temperature), 1e-3), 0.5)
  per_sample = []
  for l in m.router_layers:
    if l < cfg.num_layers / 2:
      continue
    for b in range(logits.shape[0]):
      present = [d for d in range(scores[l].shape[1]) if np.isfinite(scores[l][b, d])]
      if not present:
        continue
      y = np.array([batch["aux_labels"][b, d - 1] > 0 for d in present], np.float64)
      logp = log_softmax(scores[l][b, present] / tau)
      per_sample.append(-np.sum(y * logp) / max(1.0, y.sum()))
  aux = np.mean(per_sample) if per_sample else 0.0
  return {"loss": m.lm_weight * lm + m.aux_weight * aux + m.answer_weight * ans,
          "lm_loss": lm, "aux_loss": aux, "answer_loss": ans}


def padded_selection(selected, k):
  return np.array([list(s) + [-1] * (k - len(s)) for s in selected])


def assert_unambiguous(scores, k):
  """The test is only meaningful if float32 noise cannot flip the reference's selection."""
  for row in scores:
    fin = np.sort(row[np.isfinite(row)])[::-1]
    gaps = np.diff(fin[:k + 1])
    assert np.all(np.abs(gaps) > SELECTION_MARGIN), f"near-tie in the reference scores {fin}"


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def batch_arrays():
  return make_batch(seed=0)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, batch_arrays):
  cfg = make_config(request.param)
  params = random_params(cfg, seed=1)
  out = fw.run(from_params(cfg, params), fw.Batch.from_arrays(batch_arrays))
  ref = ref_forward(cfg, params, batch_arrays)
  return cfg, params, out, ref


# --- forward vs reference ----------------------------------------------------------------------

def test_batch_follows_the_spec_conventions(batch_arrays):
  """Sanity of the input (SPEC §2): roles, document-wise positions, active context from t + k."""
  d, pos = batch_arrays["doc_ids"][0], batch_arrays["position_ids"][0]
  assert d[:12].tolist() == [-2, -2, -2, 1, 2, 2, 2, 3, 3, 3, 3, 4]
  assert pos[:12].tolist() == [0, 1, 2, 0, 0, 1, 2, 0, 1, 2, 3, 0]
  first_query = int(np.flatnonzero(d == 0)[0])
  assert pos[first_query] == 3 + TOP_K
  assert batch_arrays["attention_mask"][1, :15].sum() == 0  # left padding


def test_logits_match_reference_on_valid_tokens(case, batch_arrays):
  _, _, out, (logits, _, _) = case
  valid = batch_arrays["attention_mask"].astype(bool)
  got = np.asarray(out.logits)
  assert got.shape == logits.shape
  np.testing.assert_allclose(got[valid], logits[valid], atol=LOGITS_ATOL, rtol=LOGITS_RTOL)


def test_document_scores_match_reference(case):
  cfg, _, out, (_, scores, _) = case
  assert sorted(out.doc_scores) == list(cfg.msa.router_layers)
  for l in cfg.msa.router_layers:
    got, want = np.asarray(out.doc_scores[l]), scores[l]
    assert got.shape == want.shape == (len(ROWS), 6)
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=f"layer {l}")
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=SCORES_ATOL, rtol=0, err_msg=f"layer {l}")


def test_selections_match_reference(case):
  cfg, _, out, (_, scores, selected) = case
  for l in cfg.msa.router_layers:
    assert_unambiguous(scores[l], TOP_K)
    want = padded_selection(selected[l], TOP_K)
    np.testing.assert_array_equal(np.asarray(out.selected[l]), want, err_msg=f"layer {l}")
    assert want[2, 2] == -1 and np.all(want[3] == -1)  # 2 documents < k; no routing token


def test_losses_match_reference(case, batch_arrays):
  cfg, _, out, (logits, scores, _) = case
  want = ref_losses(cfg, logits, scores, batch_arrays)
  assert want["aux_loss"] > 0 and want["answer_loss"] > 0
  for name, value in want.items():
    np.testing.assert_allclose(float(getattr(out.losses, name)), value, rtol=LOSS_RTOL, err_msg=name)


def test_document_logits_equal_those_of_the_document_alone(case, batch_arrays):
  """Documents never see memory, templates, queries or other documents (SPEC §4): the logits of
  row 0's document 5 equal the reference's logits for a batch holding only that document."""
  cfg, params, out, _ = case
  d = batch_arrays["doc_ids"][0]
  idx = np.flatnonzero(d == 5)
  alone = {k: batch_arrays[k][:1, idx].copy() for k in ("input_ids", "position_ids")}
  alone["doc_ids"] = np.ones((1, idx.size), np.int64)
  alone["attention_mask"] = np.ones((1, idx.size), np.int64)
  ref_alone, _, _ = ref_forward(cfg, params, alone)
  np.testing.assert_allclose(np.asarray(out.logits)[0, idx], ref_alone[0], atol=LOGITS_ATOL,
                             rtol=LOGITS_RTOL)


# --- gradients ---------------------------------------------------------------------------------

GRAD_CASE = "decoupled_G1_paper"


@pytest.fixture(scope="module")
def grad_case(batch_arrays):
  """(cfg, params, batch, base output, d total / d params, d (LM + answer) / d params)."""
  cfg = make_config(GRAD_CASE)
  params = random_params(cfg, seed=1)
  model = from_params(cfg, params)
  graphdef, state = nnx.split(model)
  batch = fw.Batch.from_arrays(batch_arrays)
  shapes = fw.BatchShapes.of(batch, P)
  m = cfg.msa

  @jax.jit
  def grads(state):
    def parts(s):
      losses = fw.forward(graphdef, s, batch, shapes).losses
      return losses.loss, m.lm_weight * losses.lm_loss + m.answer_weight * losses.answer_loss
    _, vjp = jax.vjp(parts, state)
    one, zero = jnp.float32(1), jnp.float32(0)
    return vjp((one, zero))[0], vjp((zero, one))[0]

  g_total, g_lm = grads(state)
  out = fw.run(model, batch)
  return cfg, params, batch, out, nnx.to_pure_dict(g_total), nnx.to_pure_dict(g_lm)


def _doc_token_ids(batch_arrays, row, doc):
  d = batch_arrays["doc_ids"][row]
  return batch_arrays["input_ids"][row][(d == doc) & (batch_arrays["attention_mask"][row] > 0)]


def test_gradients_are_finite(grad_case):
  *_, g_total, g_lm = grad_case
  for g in (g_total, g_lm):
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
      assert np.all(np.isfinite(np.asarray(leaf))), jax.tree_util.keystr(path)


def test_lm_gradient_reaches_selected_documents_through_pooled_memory(grad_case, batch_arrays):
  """Labels sit on answers only, so a document token's embedding gets gradient only via K̄/V̄:
  nonzero for documents some router layer selected, exactly zero for documents none selected."""
  cfg, _, _, out, _, g_lm = grad_case
  emb = np.asarray(g_lm["embed"]["embedding"])
  selected = {l: np.asarray(out.selected[l]) for l in cfg.msa.router_layers}
  checked_selected = checked_unselected = 0
  for row, segments in enumerate(ROWS):
    for doc in range(1, sum(r == "doc" for r, _ in segments) + 1):
      rows_of_doc = _doc_token_ids(batch_arrays, row, doc)
      norm = np.abs(emb[rows_of_doc]).sum()
      if any(doc in selected[l][row] for l in selected):
        assert norm > 0, f"row {row} doc {doc} is selected but gets no gradient"
        checked_selected += 1
      else:
        assert norm == 0.0, f"row {row} doc {doc} is never selected yet gets gradient {norm}"
        checked_unselected += 1
  assert checked_selected >= 3 and checked_unselected >= 2


def test_router_projections_learn_only_from_the_aux_loss_of_upper_layers(grad_case):
  """Top-k is discrete: LM gradients never reach the router; InfoNCE reaches layers ≥ L/2 only."""
  _, _, _, _, g_total, g_lm = grad_case
  for l in ROUTER_LAYERS:
    for name in ("router_q_proj", "router_k_proj"):
      assert np.all(np.asarray(g_lm["layers"][l]["attn"][name]["kernel"]) == 0.0), (l, name)
      total = np.abs(np.asarray(g_total["layers"][l]["attn"][name]["kernel"])).sum()
      assert (total > 0) == (l >= NUM_LAYERS / 2), (l, name, total)


def _directional_fd(cfg, params, batch, direction, eps, base_selected):
  def loss_at(sign):
    shifted = jax.tree_util.tree_map(lambda p, d: np.asarray(p) + np.float32(sign * eps) * d, params,
                                     direction)  # in numpy: no eager XLA compiles
    out = fw.run(from_params(cfg, shifted), batch)
    for l, sel in base_selected.items():  # the discrete choice must not change inside ±eps
      np.testing.assert_array_equal(np.asarray(out.selected[l]), np.asarray(sel))
    return float(out.losses.loss)
  return (loss_at(1.0) - loss_at(-1.0)) / (2 * eps)


@pytest.mark.parametrize("subspace", ["all_parameters", "selected_document_embeddings"])
def test_total_loss_gradient_matches_finite_differences(grad_case, batch_arrays, subspace):
  """(L(θ + εd) − L(θ − εd)) / 2ε = <∇L, d> in float32 (loose), d a unit direction in a subspace.

  d ∝ ĝ + r̂: the (normalised) gradient restricted to the subspace plus random noise in it, so the
  directional derivative is large enough for float32 and every coordinate of the subspace counts.
  all_parameters: every trained tensor; selected_document_embeddings: only the embedding rows of
  the tokens of row 0's top document (which reach the loss through pooled K/V and routing keys).
  """
  cfg, params, batch, out, g_total, _ = grad_case
  rng = np.random.default_rng(7)
  leaves, tmap = jax.tree_util.tree_leaves, jax.tree_util.tree_map
  mask = tmap(lambda p: np.ones(np.shape(p)), params)
  mask["temperature"] = np.zeros(())  # a buffer, not trained
  if subspace == "selected_document_embeddings":
    mask = tmap(np.zeros_like, mask)
    mask["embed"]["embedding"][_doc_token_ids(batch_arrays, 0, int(np.asarray(out.selected[2])[0, 0]))] = 1.0

  def unit(tree):
    norm = np.sqrt(sum(np.sum(np.square(x)) for x in leaves(tree)))
    return tmap(lambda a: a / norm, tree)

  grad = tmap(lambda g, m: np.asarray(g, np.float64) * m, jax.tree_util.tree_structure(mask).unflatten(
      jax.tree_util.tree_structure(mask).flatten_up_to(g_total)), mask)
  noise = tmap(lambda m: rng.standard_normal(m.shape) * m, mask)
  direction = unit(tmap(lambda a, b: a + b, unit(grad), unit(noise)))
  analytic = sum(float(np.sum(g * d)) for g, d in zip(leaves(grad), leaves(direction)))
  assert analytic > 1e-2, "the loss must depend on this direction"
  direction = tmap(lambda d: d.astype(np.float32), direction)
  numeric = _directional_fd(cfg, params, batch, direction, FD_EPS, out.selected)
  np.testing.assert_allclose(numeric, analytic, rtol=FD_RTOL)
