"""`msa-jax encode` / `generate`: official parity through the disk bank, crash-resume, bad banks."""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import OFFICIAL, official_request_files
from msa_jax import cli

CKPT = str(OFFICIAL / "ckpt")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("cli_engine")
  ref = official_request_files(d)
  assert cli.main(["encode", "--checkpoint", CKPT, "--documents", str(d / "docs.npz"), "--bank",
                   str(d / "bank"), "--shard-docs", "4"]) == 0
  return d, ref


@pytest.mark.parametrize("content", ["callback", "paged", "device"])
def test_generate_from_a_disk_bank_reproduces_the_official_run(files, content, tmp_path):
  d, ref = files
  out = tmp_path / "gen.npz"
  assert cli.main(["generate", "--checkpoint", CKPT, "--bank", str(d / "bank"), "--batch",
                   str(d / "req.npz"), "--max-new-tokens", "4", "--output", str(out),
                   "--content", content]) == 0
  with np.load(out) as f:
    got = dict(f)
  assert set(got) == {"stage2_logits", "selected_docs_L2", "selected_docs_L3", "decode_tokens",
                      "decode_logits"}
  valid = ref["stage2_attention_mask"].astype(bool)
  np.testing.assert_allclose(got["stage2_logits"][valid], ref["stage2_logits"][valid], atol=1e-5)
  for l in (2, 3):
    np.testing.assert_array_equal(got[f"selected_docs_L{l}"], ref[f"stage2_selected_doc_ids_L{l}"])
  np.testing.assert_array_equal(got["decode_tokens"], ref["decode_tokens"])
  np.testing.assert_allclose(got["decode_logits"], ref["decode_logits"], atol=1e-5)


def test_a_corrupted_bank_file_is_named(files, tmp_path, capsys):
  import shutil
  d, _ = files
  bank = tmp_path / "bank"
  shutil.copytree(d / "bank", bank)
  victim = sorted(bank.glob("shards/*/values_L3.npy"))[0]
  raw = bytearray(victim.read_bytes())
  raw[-5] ^= 0xFF
  victim.write_bytes(bytes(raw))
  rc = cli.main(["generate", "--checkpoint", CKPT, "--bank", str(bank), "--batch",
                 str(d / "req.npz"), "--max-new-tokens", "2", "--output", str(tmp_path / "o.npz")])
  assert rc == 2
  assert victim.name in capsys.readouterr().err


def test_a_bank_of_another_model_is_refused(files, tmp_path, capsys):
  d, _ = files
  rc = cli.main(["generate", "--checkpoint", str(OFFICIAL / "ckpt_nodecouple"), "--bank",
                 str(d / "bank"), "--batch", str(d / "req.npz"), "--max-new-tokens", "2",
                 "--output", str(tmp_path / "o.npz")])
  assert rc == 2
  assert "config_fingerprint" in capsys.readouterr().err


def test_an_encode_killed_midway_resumes_to_the_same_bank(tmp_path):
  rng = np.random.default_rng(0)
  m = 120
  lengths = rng.integers(1, 30, m)
  tokens = np.full((m, 30), -1)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(0, 320, n)
  docs = tmp_path / "docs.npz"
  np.savez(docs, tokens=tokens, lengths=lengths, template=np.array([5, 6, 7]))
  args = ["encode", "--checkpoint", CKPT, "--documents", str(docs), "--shard-docs", "3"]
  cmd = [sys.executable, "-m", "msa_jax.cli"]
  killed = tmp_path / "killed"
  proc = subprocess.Popen(cmd + args + ["--bank", str(killed)], stderr=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL)
  manifest = killed / "manifest.json"
  deadline = time.time() + 120
  while time.time() < deadline:  # wait until a few shards are committed, then kill
    try:
      if json.loads(manifest.read_text())["num_docs"] >= 9:
        break
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
      pass
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  committed = json.loads(manifest.read_text())["num_docs"]
  assert 9 <= committed < m, "the encode must be killed part-way"
  assert cli.main(args + ["--bank", str(killed)]) == 0  # resume
  assert cli.main(args + ["--bank", str(tmp_path / "oneshot")]) == 0
  a = json.loads(manifest.read_text())
  b = json.loads((tmp_path / "oneshot" / "manifest.json").read_text())
  assert a["num_docs"] == b["num_docs"] == m
  assert a["shards"] == b["shards"]  # same files, sizes and sha256 checksums
  for f in sorted((tmp_path / "oneshot").rglob("*.npy")):
    rel = f.relative_to(tmp_path / "oneshot")
    assert (killed / rel).read_bytes() == f.read_bytes(), rel


def random_docs(path, seed: int, m: int) -> None:
  rng = np.random.default_rng(seed)
  lengths = rng.integers(1, 12, m)
  tokens = np.full((m, 12), -1)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.integers(0, 320, n)
  np.savez(path, tokens=tokens, lengths=lengths)


def test_a_bank_remembers_its_input_and_refuses_other_documents(tmp_path, capsys):
  from msa_jax.memory import store
  for name, seed, m in (("a", 1, 6), ("b", 2, 6)):
    random_docs(tmp_path / f"{name}.npz", seed, m)
  with np.load(tmp_path / "a.npz") as f:  # a8: a's 6 documents, then 2 more
    a = dict(f)
  with np.load(tmp_path / "b.npz") as f:
    b = dict(f)
  np.savez(tmp_path / "a8.npz", tokens=np.concatenate([a["tokens"], b["tokens"][:2]]),
           lengths=np.concatenate([a["lengths"], b["lengths"][:2]]))
  bank = tmp_path / "bank"
  encode = lambda docs, *extra: cli.main(["encode", "--checkpoint", CKPT, "--documents",
                                          str(tmp_path / docs), "--bank", str(bank),
                                          "--shard-docs", "4", *extra])
  assert encode("a.npz") == 0
  manifest = (bank / "manifest.json").read_bytes()
  for other in ("b.npz", "a8.npz"):  # other documents, and the same ones plus two
    capsys.readouterr()
    assert encode(other) == 2
    assert "encoded from another input" in capsys.readouterr().err
    assert (bank / "manifest.json").read_bytes() == manifest
  assert encode("a.npz") == 0  # the same input again: nothing to do
  assert "already holds all 6 documents" in capsys.readouterr().out
  assert (bank / "manifest.json").read_bytes() == manifest

  store.delete_documents(bank, [1, 4])
  store.compact(bank)
  assert encode("a.npz") == 0  # deleted documents stay deleted
  assert store.open_bank(bank).doc_ids.tolist() == [0, 2, 3, 5]

  assert encode("b.npz", "--append") == 0  # new documents under new ids
  assert encode("b.npz", "--append") == 0  # and an append is not repeated
  got = store.open_bank(bank)
  assert got.doc_ids.tolist() == [0, 2, 3, 5, 6, 7, 8, 9, 10, 11]
  assert got.lengths[4:].tolist() == b["lengths"].tolist()


def test_encode_refuses_an_empty_input_and_creates_no_bank(tmp_path, capsys):
  np.savez(tmp_path / "none.npz", tokens=np.zeros((0, 4), np.int64),
           lengths=np.zeros(0, np.int64))
  assert cli.main(["encode", "--checkpoint", CKPT, "--documents", str(tmp_path / "none.npz"),
                   "--bank", str(tmp_path / "bank")]) == 2
  assert "no documents to encode" in capsys.readouterr().err
  assert not (tmp_path / "bank").exists()


def test_encode_reads_jsonl_text_with_a_tokenizer(tmp_path):
  from tokenizers import Tokenizer, models, pre_tokenizers
  words = ["the", "cat", "sat", "on", "mat", "a", "dog", "ran"]
  tok = Tokenizer(models.WordLevel({w: i + 1 for i, w in enumerate(words)} | {"[UNK]": 0},
                                   unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "docs.jsonl").write_text(
      '{"text": "the cat sat on the mat"}\n\n{"text": "a dog ran"}\n')
  assert cli.main(["encode", "--checkpoint", CKPT, "--documents", str(tmp_path / "docs.jsonl"),
                   "--tokenizer", str(tmp_path / "tokenizer.json"), "--bank",
                   str(tmp_path / "bank")]) == 0
  from msa_jax.data import render
  from msa_jax.memory import store
  bank = store.open_bank(tmp_path / "bank")
  texts = ["the cat sat on the mat", "a dog ran"]  # rendered in the memory format with their ids
  assert bank.lengths.tolist() == [len(tok.encode(render.doc_text(i, t)).ids)
                                   for i, t in enumerate(texts)]
  assert bank.doc_ids.tolist() == [0, 1]
  assert {i: t.text for i, t in store.read_texts(tmp_path / "bank").items()} == dict(
      enumerate(texts))


def test_encode_rejects_jsonl_without_a_tokenizer_and_malformed_lines(tmp_path, capsys):
  (tmp_path / "docs.jsonl").write_text('{"text": "x"}\n')
  args = ["encode", "--checkpoint", CKPT, "--documents", str(tmp_path / "docs.jsonl"), "--bank",
          str(tmp_path / "bank")]
  assert cli.main(args) == 2  # the official checkpoint ships no tokenizer.json
  assert "has no usable tokenizer.json" in capsys.readouterr().err
  np.savez(tmp_path / "bad.npz", tokens=np.ones((2, 3)))
  args[4] = str(tmp_path / "bad.npz")
  assert cli.main(args) == 2
  assert "must hold tokens [M, Lmax] and lengths [M]" in capsys.readouterr().err
