"""Checkpoints carry their tokenizer as a `tokenizers` tokenizer.json, the byte-level models too.

`byte_tokenizer_json()` is ByteTokenizer as a tokenizer.json: the same ids for every text, and
decode gives the text back. `hf.save_checkpoint(tokenizer=...)` writes it with the weights and
`hf.load_tokenizer` reads it back; the shipped models carry exactly that file.
"""

import json
import os
import re

import numpy as np
import pytest
import tokenizers

from msa_jax import demo
from msa_jax.data import render, synthetic
from msa_jax.data import tokenizer as tokenizer_lib
from msa_jax.data.text import Split
from msa_jax.data.tokenizer import SPECIAL_TEXT, ByteTokenizer, HFTokenizer, Special
from msa_jax.engine import interleave
from msa_jax.engine.interleave import Naming
from msa_jax.engine.run import BankRunner
from msa_jax.interop import hf
from msa_jax.train import evaluate

BYTES = ByteTokenizer()
SPECIALS = list(SPECIAL_TEXT.values())
# Code point ranges the random texts draw from (no surrogates: no UTF-8 text holds them).
RANGES = [
    (0x20, 0x7E),  # printable ASCII, including "<", "|", ">" and "-" of the control strings
    (0x00, 0x1F), (0x7F, 0x9F),  # C0 and C1 controls, newlines and tabs among them
    (0xA0, 0xFF),  # Latin-1, whose printable bytes stand for themselves at the byte level
    (0x100, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF),  # Latin extended, Greek, Cyrillic
    (0x300, 0x36F),  # combining marks (no normalizer may compose them)
    (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x3040, 0x30FF),  # CJK, Hangul, kana
    (0xE000, 0xFFFD),  # private use and specials, BOM-like FEFF included
    (0x1F300, 0x1FAFF), (0x10000, 0x10FFFF),  # emoji; any supplementary code point
]
PIECES = SPECIALS + [" ", "\n", "\r\n", "\t", "  ", "<", ">", "<|", "|>", "<|im_", "<End-of-",
                     "<|im_start|im_end|>", "<<pad>>", "\u200d", "\ufeff"]


def _random_text(rng: np.random.Generator) -> str:
  parts = []
  for _ in range(rng.integers(0, 12)):
    if rng.random() < 0.35:
      parts.append(PIECES[rng.integers(len(PIECES))])
    else:
      lo, hi = RANGES[rng.integers(len(RANGES))]
      cps = rng.integers(lo, hi + 1, size=rng.integers(1, 8))
      parts.append("".join(chr(c) for c in cps if not 0xD800 <= c <= 0xDFFF))
  return "".join(parts)


def _byte_file(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_bytes(tokenizer_lib.byte_tokenizer_json().encode("utf-8"))
  return path


# --- the byte tokenizer.json is ByteTokenizer ----------------------------------------------------


def test_random_texts_get_the_byte_tokenizer_ids_and_decode_back(tmp_path):
  lib = tokenizer_lib.byte_hf_tokenizer()
  wrapped = HFTokenizer(_byte_file(tmp_path))
  rng = np.random.default_rng(20240611)
  for _ in range(3000):
    text = _random_text(rng)
    want = BYTES.encode(text).tolist()
    ids = lib.encode(text, add_special_tokens=False).ids
    assert ids == want, text
    assert lib.decode(ids, skip_special_tokens=False) == text
    assert wrapped.encode(text).tolist() == want and wrapped.decode(want) == text


@pytest.mark.parametrize("text", [
    "", " ", "  leading and trailing  ", "\n", "\r\n\r\n", "a\tb", "é", "e\u0301", "中文", "😀👍🏽",
    "\x00\x7f\x80\x9f",
    "<|im_start|>user\nquestion<|im_end|>\n<|im_start|>assistant\n",
    "<pad><pad><|endoftext|>", "<End-of-Retrieve><|object_ref_end|>", " <|im_end|> ",
    "<<|im_end|>>", "<|im_start|im_end|>", "<|im_", "<End-of-Retrieve", "x<pad>y",
])
def test_edge_cases_get_the_byte_tokenizer_ids_and_decode_back(text):
  lib = tokenizer_lib.byte_hf_tokenizer()
  ids = lib.encode(text, add_special_tokens=False).ids
  assert ids == BYTES.encode(text).tolist()
  assert lib.decode(ids, skip_special_tokens=False) == text
  assert lib.encode(text).ids == ids  # no post-processor adds anything either


def test_every_byte_and_control_token_has_the_byte_tokenizer_id(tmp_path):
  tok = HFTokenizer(_byte_file(tmp_path))
  assert [tok.special(s) for s in Special] == [int(s) for s in Special]
  assert tok.vocab_size == 262 <= BYTES.vocab_size
  # Every byte that UTF-8 text can hold, as a lead or continuation byte.
  text = "".join(chr(c) for c in range(0x800))  # ASCII, leads C2-DF, every continuation byte
  text += "".join(chr(max(0x800, (lead - 0xE0) << 12)) for lead in range(0xE0, 0xF0))
  text += "".join(chr(max(0x10000, (lead - 0xF0) << 18)) for lead in range(0xF0, 0xF5))
  ids = tok.encode(text)
  assert set(range(0xC0)) | set(range(0xC2, 0xF5)) == set(ids.tolist())
  assert ids.tolist() == BYTES.encode(text).tolist()
  # The library's own list of byte-level symbols is the vocabulary's.
  vocab = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json")).get_vocab(False)
  assert sorted(vocab) == sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet())
  assert sorted(vocab.values()) == list(range(256))


def test_the_library_reads_every_field_as_written():
  """No field is misspelt or defaulted differently: each reads back with the value written."""
  written = json.loads(tokenizer_lib.byte_tokenizer_json())
  read = json.loads(tokenizer_lib.byte_hf_tokenizer().to_str())

  def check(w, r, where):
    if isinstance(w, dict):
      for k, v in w.items():
        assert k in r, f"{where}.{k} is dropped by the library"
        check(v, r[k], f"{where}.{k}")
    else:
      assert w == r, where

  check(written, read, "tokenizer")
  assert written["normalizer"] is None
  assert written["pre_tokenizer"]["add_prefix_space"] is False


def test_the_json_is_deterministic_text():
  a, b = tokenizer_lib.byte_tokenizer_json(), tokenizer_lib.byte_tokenizer_json()
  assert a == b and a.endswith("}\n") and "\r" not in a


def test_hf_vocab_size_is_one_more_than_the_largest_id(tmp_path):
  """So that every id it produces is below it, even where ids leave gaps."""
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "a": 5}, unk_token="[UNK]"))
  tok.save(str(tmp_path / "gaps.json"))
  assert HFTokenizer(tmp_path / "gaps.json").vocab_size == 6


# --- checkpoints carry it -----------------------------------------------------------------------


def test_save_checkpoint_writes_the_tokenizer_and_load_tokenizer_finds_it(official_model, tmp_path):
  cfg, params = official_model
  hf.save_checkpoint(tmp_path, cfg, params, tokenizer=ByteTokenizer())
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors", "tokenizer.json"]
  path = tmp_path / "tokenizer.json"
  assert path.read_bytes() == tokenizer_lib.byte_tokenizer_json().encode("utf-8")
  probe = tmp_path.parent / f"{tmp_path.name}-probe"
  probe.write_text("")  # ordinary (umask) permissions, not a temporary file's 0600
  assert path.stat().st_mode == probe.stat().st_mode
  tok = hf.load_tokenizer(tmp_path)
  assert isinstance(tok, HFTokenizer)
  text = "<|im_start|>user\nWhat is the value? é 中<|im_end|>"
  assert tok.encode(text).tolist() == BYTES.encode(text).tolist()


def test_an_hf_tokenizer_is_copied_byte_for_byte(official_model, tmp_path):
  cfg, params = official_model
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
  raw.add_special_tokens(SPECIALS)
  src = tmp_path / "src.json"
  src.write_bytes(raw.to_str(pretty=True).replace("\n", "\r\n").encode("utf-8"))  # CRLF kept
  hf.save_checkpoint(tmp_path / "ckpt", cfg, params, tokenizer=HFTokenizer(src))
  assert (tmp_path / "ckpt" / "tokenizer.json").read_bytes() == src.read_bytes()
  eos = hf.load_tokenizer(tmp_path / "ckpt").special(Special.EOS)
  assert eos == raw.token_to_id("<|endoftext|>")


def test_without_a_tokenizer_none_is_written_and_loading_names_the_directory(official_model,
                                                                              tmp_path):
  cfg, params = official_model
  hf.save_checkpoint(tmp_path, cfg, params)
  assert not (tmp_path / "tokenizer.json").exists()
  with pytest.raises(ValueError, match=f"{re.escape(str(tmp_path))}.* has no tokenizer.json"):
    hf.load_tokenizer(tmp_path)


@pytest.mark.parametrize("content", [b'{"not": "a tokenizer"}', b"{ truncated", b"\xff\xfe"])
def test_a_malformed_tokenizer_json_is_a_value_error_naming_the_file(tmp_path, content):
  (tmp_path / "tokenizer.json").write_bytes(content)
  with pytest.raises(ValueError, match=re.escape(str(tmp_path / "tokenizer.json"))):
    hf.load_tokenizer(tmp_path)


def test_a_tokenizer_beyond_the_model_vocabulary_is_refused_before_writing(official_model,
                                                                           tmp_path):
  cfg, params = official_model  # vocab_size 320
  raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({"[UNK]": 0, "x": 320},
                                                         unk_token="[UNK]"))
  raw.save(str(tmp_path / "big.json"))
  with pytest.raises(hf.CheckpointError, match="320"):
    hf.save_checkpoint(tmp_path / "ckpt", cfg, params, tokenizer=HFTokenizer(tmp_path / "big.json"))
  with pytest.raises(TypeError, match="tokenizer.json"):
    hf.save_checkpoint(tmp_path / "ckpt", cfg, params, tokenizer=object())
  assert not (tmp_path / "ckpt").exists()


# --- the shipped models carry it ----------------------------------------------------------------


@pytest.mark.parametrize("model", list(demo.Shipped))
def test_shipped_models_carry_exactly_the_byte_tokenizer_json(model):
  path = demo.path(model) / "tokenizer.json"
  assert path.read_bytes() == tokenizer_lib.byte_tokenizer_json().encode("utf-8")
  tok = hf.load_tokenizer(demo.path(model))
  assert tok.vocab_size <= hf.read_config(demo.path(model)).vocab_size == BYTES.vocab_size


@pytest.fixture(scope="module")
def shipped():
  return demo.load()


def test_a_niah_question_gets_the_same_ids_and_answers_from_both_tokenizers(shipped):
  model, byte_tok, data = shipped
  assert isinstance(byte_tok, ByteTokenizer)
  hf_tok = hf.load_tokenizer(demo.path())
  ex = synthetic.example("niah_single_1", seed=3, split=Split.TEST, index=0,
                         num_docs=data.docs_per_example, doc_chars=data.doc_chars,
                         id_digits=data.id_digits)
  for a, b in zip(render.render_docs(byte_tok, range(len(ex.docs)), ex.docs),
                  render.render_docs(hf_tok, range(len(ex.docs)), ex.docs)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(render.prompt(byte_tok, ex.question).ids,
                                render.prompt(hf_tok, ex.question).ids)
  # End to end through the engine: the same memory, generated ids and answers.
  examples = [synthetic.example("niah_single_1", seed=3, split=Split.TEST, index=i,
                                num_docs=data.docs_per_example, doc_chars=data.doc_chars,
                                id_digits=data.id_digits) for i in range(2)]
  answers = []
  for tok in (byte_tok, hf_tok):
    rng = np.random.default_rng(0)
    bank, texts, _, _ = evaluate.build_memory(model, tok, examples, rng, data.id_digits)
    start = model.cfg.msa.top_k_docs + (bank.template.tokens.size if bank.template else 0)
    traces = interleave.run(interleave.runner_fn(BankRunner(model, bank)), tok,
                            [ex.question for ex in examples], texts, start_position=start,
                            max_rounds=1, naming=Naming.ROUTER, router_docs=1)
    answers.append([(t.answer, t.retrieved, t.forced_end) for t in traces])
  assert answers[0] == answers[1]
  assert all(answer for answer, _, _ in answers[0])
