"""Losses (SPEC §7) against float64 NumPy references.

LM: logits at t predict labels at t + 1; tokens labelled -100 are ignored; mean over labelled
tokens (0 when there are none). InfoNCE per sample over its present documents (finite scores):
-Σ_d y_d · log_softmax(s/τ)_d / max(1, Σ y), τ clamped to [1e-3, 0.5].
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from msa_jax.math import losses

RTOL = 1e-5
ATOL = 1e-5
IGNORE = -100

shifted_cross_entropy = jax.jit(losses.shifted_cross_entropy)
lm_loss = jax.jit(losses.lm_loss)
infonce_loss = jax.jit(losses.infonce_loss)


def ref_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max()
  return x - m - np.log(np.sum(np.exp(x - m)))


def ref_shifted_cross_entropy(logits, labels):
  total, count = 0.0, 0
  for b in range(logits.shape[0]):
    for t in range(logits.shape[1] - 1):
      y = labels[b, t + 1]
      if y == IGNORE:
        continue
      total -= ref_log_softmax(logits[b, t])[y]
      count += 1
  return total, count


def ref_lm_loss(logits, labels, rows=None):
  if rows is not None:
    labels = np.where(np.asarray(rows)[:, None], labels, IGNORE)
  total, count = ref_shifted_cross_entropy(logits, labels)
  return total / max(count, 1)


def ref_infonce(scores, positives, tau):
  tau = min(max(tau, 1e-3), 0.5)
  out = np.zeros(scores.shape[0])
  for b in range(scores.shape[0]):
    present = np.flatnonzero(np.isfinite(scores[b]))
    if present.size == 0:
      continue
    logp = ref_log_softmax(scores[b, present] / tau)
    y = positives[b, present].astype(np.float64)
    out[b] = -np.sum(y * logp) / max(1.0, y.sum())
  return out


def lm_case(seed=0, b=3, t=7, v=11):
  rng = np.random.default_rng(seed)
  logits = (3 * rng.standard_normal((b, t, v))).astype(np.float32)
  labels = rng.integers(0, v, (b, t))
  labels[rng.random((b, t)) < 0.4] = IGNORE
  labels[:, 1] = rng.integers(0, v, b)  # some labelled token in every row
  labels[2] = IGNORE  # a row with nothing labelled
  return logits, labels.astype(np.int32)


@pytest.mark.parametrize("seed", [0, 1])
def test_shifted_cross_entropy_sum_and_count(seed):
  logits, labels = lm_case(seed)
  total, count = shifted_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  want_total, want_count = ref_shifted_cross_entropy(logits, labels)
  assert float(count) == want_count
  np.testing.assert_allclose(float(total), want_total, rtol=RTOL)


def test_the_first_label_and_the_last_logit_are_never_used():
  logits, labels = lm_case(3)
  total, count = shifted_cross_entropy(jnp.asarray(logits), jnp.asarray(labels))
  labels2 = labels.copy()
  labels2[:, 0] = 4  # no logit predicts token 0
  logits2 = logits.copy()
  logits2[:, -1] = 123.0  # the last position predicts nothing
  total2, count2 = shifted_cross_entropy(jnp.asarray(logits2), jnp.asarray(labels2))
  assert float(total2) == float(total) and float(count2) == float(count)


@pytest.mark.parametrize("rows", [None, [True, False, True], [False, True, False]],
                         ids=["all_rows", "rows_0_2", "row_1"])
def test_lm_loss_is_the_mean_over_labelled_tokens_of_selected_rows(rows):
  logits, labels = lm_case(4)
  got = lm_loss(jnp.asarray(logits), jnp.asarray(labels),
                None if rows is None else jnp.asarray(rows))
  np.testing.assert_allclose(float(got), ref_lm_loss(logits, labels, rows), rtol=RTOL)


def test_lm_loss_is_zero_when_nothing_is_labelled():
  logits, labels = lm_case(5)
  assert float(lm_loss(jnp.asarray(logits), jnp.full_like(jnp.asarray(labels), IGNORE))) == 0.0
  assert float(lm_loss(jnp.asarray(logits), jnp.asarray(labels), jnp.array([False, False, True]))) == 0.0


# --- InfoNCE -----------------------------------------------------------------------------------

NINF = -np.inf
SCORES = np.array([
    [NINF, 0.3, -0.2, 0.9, 0.1, NINF],  # doc 5 absent
    [NINF, NINF, 0.4, NINF, -0.7, 0.2],  # docs 1 and 3 absent
    [NINF, 0.5, 0.5, 0.5, 0.5, 0.5],  # all tied
    [NINF, 0.1, -0.3, 0.2, NINF, NINF],  # no positives
    [NINF, NINF, NINF, NINF, NINF, NINF],  # no documents at all
], np.float32)
POSITIVES = np.array([
    [0, 1, 0, 1, 0, 1],  # a positive on an absent doc is ignored
    [0, 0, 1, 0, 0, 1],
    [0, 0, 0, 1, 0, 0],
    [0, 0, 0, 0, 0, 0],
    [0, 1, 0, 0, 0, 0],
], bool)


@pytest.mark.parametrize("tau,effective", [(0.1, 0.1), (0.5, 0.5), (1e-6, 1e-3), (3.0, 0.5),
                                           (0.037, 0.037)])
def test_infonce_matches_reference_with_clamped_temperature(tau, effective):
  loss, has_docs = infonce_loss(jnp.asarray(SCORES), jnp.asarray(POSITIVES), jnp.float32(tau))
  np.testing.assert_array_equal(np.asarray(has_docs), [True, True, True, True, False])
  want = ref_infonce(SCORES.astype(np.float64), POSITIVES, tau)
  np.testing.assert_allclose(np.asarray(loss), want, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(want, ref_infonce(SCORES.astype(np.float64), POSITIVES, effective))


def test_infonce_rows_without_positives_or_documents_are_zero():
  loss, _ = infonce_loss(jnp.asarray(SCORES), jnp.asarray(POSITIVES), jnp.float32(0.1))
  assert float(loss[3]) == 0.0 and float(loss[4]) == 0.0


def test_infonce_of_uniform_scores_is_log_of_present_count():
  """All five present documents tied: every document gets probability 1/5."""
  loss, _ = infonce_loss(jnp.asarray(SCORES), jnp.asarray(POSITIVES), jnp.float32(0.1))
  np.testing.assert_allclose(float(loss[2]), np.log(5.0), rtol=RTOL)


def test_infonce_sign_lowering_the_positive_score_raises_the_loss():
  """With a single positive: lowering it, or raising a negative, increases the loss."""
  base = SCORES[2:3].copy()
  base[0, 1:] = [0.3, -0.2, 0.4, 0.1, 0.0]
  lower = base.copy()
  lower[0, 3] -= 0.3  # doc 3 is the only positive
  raise_neg = base.copy()
  raise_neg[0, 2] += 0.3  # doc 2 is a negative
  y = jnp.asarray(POSITIVES[2:3])
  l0, l1, l2 = (float(infonce_loss(jnp.asarray(s), y, jnp.float32(0.1))[0][0])
                for s in (base, lower, raise_neg))
  assert l1 > l0 and l2 > l0 and l0 > 0


def test_infonce_gradients_are_finite_with_absent_documents():
  def total(scores, tau):
    loss, _ = losses.infonce_loss(scores, jnp.asarray(POSITIVES), tau)
    return jnp.sum(loss)

  gs, gt = jax.jit(jax.grad(total, argnums=(0, 1)))(jnp.asarray(SCORES), jnp.float32(0.1))
  gs = np.asarray(gs)
  assert np.all(np.isfinite(gs)) and np.isfinite(float(gt))
  assert np.all(gs[~np.isfinite(SCORES)] == 0.0), "absent documents get no gradient"
  # row 2 has a single positive (doc 3): descent raises it and lowers every negative
  assert gs[2, 3] < 0 and np.all(gs[2, [1, 2, 4, 5]] > 0)
  # float64 reference gradient by central differences on the present scores
  eps = 1e-3
  s64 = SCORES.astype(np.float64)
  for b, d in [(0, 1), (0, 2), (1, 5), (2, 3)]:
    up, dn = s64.copy(), s64.copy()
    up[b, d] += eps
    dn[b, d] -= eps
    fd = (ref_infonce(up, POSITIVES, 0.1).sum() - ref_infonce(dn, POSITIVES, 0.1).sum()) / (2 * eps)
    np.testing.assert_allclose(gs[b, d], fd, rtol=1e-3, atol=1e-4)


def test_infonce_temperature_gradient_vanishes_when_clamped():
  def total(tau):
    return jnp.sum(losses.infonce_loss(jnp.asarray(SCORES), jnp.asarray(POSITIVES), tau)[0])

  g = jax.jit(jax.grad(total))
  assert float(g(jnp.float32(2.0))) == 0.0
  assert float(g(jnp.float32(0.2))) != 0.0
