"""Dense generation (the baselines' engine) is the model's ordinary causal forward.

Chunked prefill with left padding gives the packed dense path's logits (every token role -1,
itself tested equal to transformers' Qwen3), and greedy decoding from its caches gives the tokens
of re-running that forward on the growing sequence.
"""

import jax.numpy as jnp
import numpy as np
from flax import nnx

from msa_jax import forward
from msa_jax.config import MSAConfig, ModelConfig
from msa_jax.data import render
from msa_jax.data.tokenizer import ByteTokenizer
from msa_jax.engine import dense, decode
from msa_jax.interop import hf
from msa_jax.nn.model import from_params

CFG = ModelConfig(vocab_size=264, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                  num_kv_heads=2, head_dim=8, rope_theta=10000.0, tie_word_embeddings=True,
                  max_position_embeddings=512,
                  msa=MSAConfig(top_k_docs=2, pooling_size=4, router_layers=(1,)))
MODEL = from_params(CFG, hf.init_params(CFG, 3))


def _packed_logits(ids: np.ndarray, positions: np.ndarray) -> np.ndarray:
  batch = forward.Batch.from_arrays(dict(
      input_ids=ids[None], doc_ids=np.full((1, ids.size), -1), attention_mask=np.ones((1, ids.size), np.int32),
      position_ids=positions[None].astype(np.int32)))
  return np.asarray(forward.run(MODEL, batch, with_losses=False).logits)[0]


def test_chunked_left_padded_prefill_matches_the_dense_forward():
  rng = np.random.default_rng(0)
  lengths, t, chunk = (23, 40), 48, 16  # three chunks; row 0 mostly padding
  ids = np.zeros((2, t), np.int32)
  mask = np.zeros((2, t), np.int32)
  pos = np.zeros((2, t), np.int32)
  rows = [rng.integers(0, 256, n).astype(np.int32) for n in lengths]
  for r, x in enumerate(rows):
    ids[r, t - x.size:], mask[r, t - x.size:], pos[r, t - x.size:] = x, 1, 5 + np.arange(x.size)
  gd, st = nnx.split(MODEL)
  ds = dense.prefill_jit(gd, st, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos),
                         max_new_tokens=4, chunk=chunk)
  for r, x in enumerate(rows):
    ref = _packed_logits(x, 5 + np.arange(x.size))[-1]
    np.testing.assert_allclose(np.asarray(ds.last_logits[r]), ref, atol=2e-5, rtol=1e-5)
    assert int(ds.next_position[r]) == 5 + x.size


def test_greedy_decode_from_dense_caches_matches_rerunning_the_forward():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 256, 13).astype(np.int32)
  gd, st = nnx.split(MODEL)
  ds = dense.prefill_jit(gd, st, jnp.asarray(x[None]), jnp.ones((1, 13), jnp.int32),
                         jnp.arange(13, dtype=jnp.int32)[None], max_new_tokens=6, chunk=13)
  got = np.asarray(decode.generate(gd, st, ds, 6).tokens)[0]
  seq = list(x)
  for _ in range(6):
    seq.append(int(np.argmax(_packed_logits(np.asarray(seq, np.int32), np.arange(len(seq)))[-1])))
  np.testing.assert_array_equal(got, seq[13:])


def test_context_pastes_documents_as_interleave_appends_them():
  tok = ByteTokenizer()
  got = tok.decode(dense.context(tok, "Who?", [(7, "Ann is here."), (3, "Bob.")]))
  assert got == ("Who?\n<|im_end|>\n<|im_start|>[7][3]<|object_ref_end|>[7]. Ann is here.\n"
                 "[3]. Bob.\n<|object_ref_end|><End-of-Retrieve>" + render.restate_text("Who?"))
  assert tok.decode(dense.context(tok, "Who?", [])) == (
      "Who?\n<|im_end|>\n<|im_start|><End-of-Retrieve>" + render.restate_text("Who?"))


def test_answer_batches_rows_of_different_lengths():
  tok = ByteTokenizer()
  qs = ["Who?", "Where is the key?", "Why?"]
  docs = [[(1, "a" * 40)], [], [(2, "b"), (3, "c" * 70)]]
  together = dense.answer(MODEL, tok, qs, docs, start_position=2, max_answer_tokens=5, chunk=32)
  alone = [dense.answer(MODEL, tok, [q], [d], start_position=2, max_answer_tokens=5, chunk=32)[0]
           for q, d in zip(qs, docs)]
  assert together == alone
