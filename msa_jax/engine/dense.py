"""Dense generation: the same model with ordinary causal attention over a plain context, no memory.

The baselines of the studies answer from text in the prompt rather than from a memory bank:
full attention over the concatenated memory (the dense baseline), documents retrieved by BM25
(RAG), the gold documents (oracle) and none (no-context). They all share `answer`, which writes
the documents exactly as Memory Interleave appends them (`[id]. text\\n...`), so that the model
sees the format it was trained on and only the choice of documents differs.

Prefill runs in query chunks of `chunk` tokens against the whole context, so memory is
O(chunk · T) rather than O(T²); decode reuses stage 3 (`decode.generate`) on the caches.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from msa_jax.data import render
from msa_jax.data.tokenizer import Special, Tokenizer
from msa_jax.engine import decode
from msa_jax.engine.prefill import DecodeState, LayerCache
from msa_jax.math import attention
from msa_jax.nn.model import MSAForCausalLM


def prefill(graphdef: nnx.GraphDef, state: nnx.State, input_ids: jax.Array, mask: jax.Array,
            positions: jax.Array, *, max_new_tokens: int, chunk: int) -> DecodeState:
  """Causal prefill of input_ids [B, T] (T a multiple of chunk; mask [B, T], 0 = padding).

  Returns the decode state whose caches hold the T tokens plus room for max_new_tokens.
  """
  model: MSAForCausalLM = nnx.merge(graphdef, state)
  b, t = input_ids.shape
  n = t // chunk
  valid = mask.astype(bool)
  x = model.embed(input_ids)
  caches = []
  key_index = jnp.arange(t)
  for layer in model.layers:
    _, q, k, v = layer.pre(x, positions)

    def attend_chunk(c, q=q, k=k, v=v):
      qc = jax.lax.dynamic_slice_in_dim(q, c * chunk, chunk, axis=1)
      qi = c * chunk + jnp.arange(chunk)
      vq = jax.lax.dynamic_slice_in_dim(valid, c * chunk, chunk, axis=1)
      m = (key_index[None, None, :] <= qi[None, :, None]) & valid[:, None, :] & vq[:, :, None]
      return attention.attend(qc, k, v, m)

    out = jax.lax.map(attend_chunk, jnp.arange(n))  # n B chunk N H
    out = jnp.moveaxis(out, 0, 1).reshape(b, t, *out.shape[3:])
    x = layer.post(x, out)
    room = [(0, 0), (0, max_new_tokens), (0, 0), (0, 0)]
    caches.append(LayerCache(keys=jnp.pad(k, room), values=jnp.pad(v, room),
                             mask=jnp.pad(valid, [(0, 0), (0, max_new_tokens)]),
                             length=jnp.asarray(t, jnp.int32)))
  last = jnp.max(jnp.where(valid, jnp.arange(t), -1), axis=1)
  h_last = jnp.take_along_axis(x, last[:, None, None], axis=1)[:, 0]
  last_pos = jnp.take_along_axis(positions, last[:, None], axis=1)[:, 0]
  return DecodeState(caches=tuple(caches), next_position=last_pos + 1,
                     last_logits=model.final_logits(h_last))


prefill_jit = jax.jit(prefill, static_argnums=(0,), static_argnames=("max_new_tokens", "chunk"))


def context(tok: Tokenizer, question: str, docs: Sequence[tuple[int, str]]) -> np.ndarray:
  """The request up to the answer, with `docs` (id, text) appended as one retrieval round.

  With no documents it is the question, the end marker and the restated question (no-context).
  """
  a = render.prompt(tok, question).ids
  if docs:
    ids, texts = zip(*docs)
    a = np.concatenate([a, tok.encode(render.ids_text(ids)),
                        tok.encode(render.injected_text(ids, texts))])
  end = tok.encode("<End-of-Retrieve>" + render.restate_text(question))
  return np.concatenate([a, end]).astype(np.int32)


def _bucket(n: int, chunk: int) -> int:
  """Padded length: a power of two up to `chunk`, then a multiple of chunk (few compiles)."""
  p = 1 << max(n - 1, 0).bit_length()
  return p if p <= chunk else -(-n // chunk) * chunk


def answer(model: MSAForCausalLM, tok: Tokenizer, questions: Sequence[str],
           docs: Sequence[Sequence[tuple[int, str]]], *, start_position: int,
           max_answer_tokens: int = 96, chunk: int = 512, batch: int = 8) -> list[str]:
  """Answers each question with its documents pasted into the prompt (greedy, dense attention).

  start_position: position of the first token (the MSA models' active tokens start at top_k).
  Returns the text after "The answer to the question is: " (or all generated text without it).
  """
  graphdef, state = nnx.split(model)
  stops = (tok.special(Special.IM_END), tok.special(Special.EOS))
  pad = tok.special(Special.PAD)
  out: list[str] = []
  for s in range(0, len(questions), batch):
    ctxs = [context(tok, q, d) for q, d in zip(questions[s:s + batch], docs[s:s + batch])]
    t = _bucket(max(c.size for c in ctxs), chunk)
    ids = np.full((len(ctxs), t), pad, np.int32)
    mask = np.zeros((len(ctxs), t), np.int32)
    pos = np.zeros((len(ctxs), t), np.int32)
    for r, c in enumerate(ctxs):  # left padded: every row's last token is at t - 1
      ids[r, t - c.size:], mask[r, t - c.size:] = c, 1
      pos[r, t - c.size:] = start_position + np.arange(c.size)
    dstate = prefill_jit(graphdef, state, jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(pos),
                         max_new_tokens=max_answer_tokens, chunk=min(chunk, t))
    gen = decode.generate(graphdef, state, dstate, max_answer_tokens, stop_tokens=stops)
    for row in np.asarray(gen.tokens):
      end = np.flatnonzero(row < 0)
      text = tok.decode(row[:end[0]] if end.size else row)
      text = text.replace("<|im_end|>", "").replace("<|endoftext|>", "")
      out.append((text.split(render.ANSWER_LEAD, 1)[1] if render.ANSWER_LEAD in text
                  else text).strip())
  return out
