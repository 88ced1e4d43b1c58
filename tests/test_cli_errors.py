"""Bad input to `msa-jax forward` / `encode` / `generate` exits with status 2 and a message naming
the problem (never a traceback, never a silent status 0), and is refused before any compute."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from conftest import OFFICIAL, load_npz, official_request_files
from msa_jax import cli

CKPT = str(OFFICIAL / "ckpt")
VOCAB = 320  # the official tiny checkpoint's vocab_size
REQUEST = ("input_ids", "doc_ids", "attention_mask", "position_ids")


def run(argv: list[str]) -> int:
  """cli.main's status; argparse errors exit through SystemExit (status 2 on the command line)."""
  try:
    return cli.main(argv)
  except SystemExit as e:
    return e.code


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The official fixture's documents encoded into a bank, and its stage-2 request."""
  d = tmp_path_factory.mktemp("cli_errors")
  ref = official_request_files(d)
  assert run(["encode", "--checkpoint", CKPT, "--documents", str(d / "docs.npz"), "--bank",
              str(d / "bank")]) == 0
  return d, ref


def generate_args(d, **kw) -> list[str]:
  a = {"checkpoint": CKPT, "bank": str(d / "bank"), "batch": str(d / "req.npz"),
       "max-new-tokens": "2", "output": str(d / "unused" / "o.npz")} | kw
  return ["generate"] + [x for k, v in a.items() for x in (f"--{k}", v)]


def forward_args(tmp_path, **kw) -> list[str]:
  a = {"checkpoint": CKPT, "batch": str(OFFICIAL / "fixture.npz"),
       "output": str(tmp_path / "o.npz")} | kw
  return ["forward"] + [x for k, v in a.items() for x in (f"--{k}", v)]


@pytest.fixture
def no_compute(monkeypatch):
  """Fails the test if the model is loaded or run: the input must be refused before that."""
  def boom(*_, **__):
    raise AssertionError("the model was loaded before the bad input was refused")
  monkeypatch.setattr(cli, "_load_model", boom)
  monkeypatch.setattr(cli, "forward_outputs", boom)
  return monkeypatch


# --- defect 3: token ids and positions are range-checked ----------------------------------------

@pytest.mark.parametrize("bad", [VOCAB, 5000, -1])
def test_encode_refuses_a_template_token_outside_the_vocabulary_and_creates_no_bank(
    files, tmp_path, capsys, bad):
  d, ref = files
  template = ref["template_head_ids"].copy()
  template[1] = bad
  np.savez(tmp_path / "docs.npz", tokens=ref["memory_doc_tokens"],
           lengths=ref["memory_doc_lens_tokens"], template=template)
  assert run(["encode", "--checkpoint", CKPT, "--documents", str(tmp_path / "docs.npz"), "--bank",
              str(tmp_path / "bank")]) == 2
  assert f"template[1] = {bad} is outside the vocabulary [0, {VOCAB})" in capsys.readouterr().err
  assert not (tmp_path / "bank").exists()


def test_a_refused_template_leaves_an_existing_bank_unchanged(files, tmp_path, capsys):
  d, ref = files
  shutil.copytree(d / "bank", tmp_path / "bank")
  before = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "bank").rglob("*")
            if p.is_file()}
  np.savez(tmp_path / "docs.npz", tokens=ref["memory_doc_tokens"],
           lengths=ref["memory_doc_lens_tokens"], template=np.array([5, 6, 5000]))
  assert run(["encode", "--checkpoint", CKPT, "--documents", str(tmp_path / "docs.npz"), "--bank",
              str(tmp_path / "bank")]) == 2
  assert "template[2] = 5000" in capsys.readouterr().err
  after = {p.relative_to(tmp_path): p.read_bytes() for p in (tmp_path / "bank").rglob("*")
           if p.is_file()}
  assert after == before


def test_encode_refuses_a_template_of_floats(files, tmp_path, capsys):
  _, ref = files
  np.savez(tmp_path / "docs.npz", tokens=ref["memory_doc_tokens"],
           lengths=ref["memory_doc_lens_tokens"], template=np.array([5.0, 6.5]))
  assert run(["encode", "--checkpoint", CKPT, "--documents", str(tmp_path / "docs.npz"), "--bank",
              str(tmp_path / "bank")]) == 2
  assert "template tokens must be integers" in capsys.readouterr().err


@pytest.mark.parametrize("name,value,message", [
    ("input_ids", 5000, f"input_ids[1, 3] = 5000 is outside the vocabulary [0, {VOCAB})"),
    ("input_ids", VOCAB, f"input_ids[1, 3] = {VOCAB} is outside the vocabulary [0, {VOCAB})"),
    ("input_ids", -5, f"input_ids[1, 3] = -5 is outside the vocabulary [0, {VOCAB})"),
    ("position_ids", -5, "position_ids[1, 3] = -5 is negative"),
])
def test_generate_refuses_a_request_token_outside_the_vocabulary_naming_row_and_value(
    files, tmp_path, capsys, name, value, message):
  d, ref = files
  req = {k: ref["stage2_" + k].copy() for k in REQUEST}
  assert req["attention_mask"][1, 3] == 1  # a real token, not padding
  req[name][1, 3] = value
  np.savez(tmp_path / "req.npz", **req)
  out = tmp_path / "o.npz"
  assert run(generate_args(d, batch=str(tmp_path / "req.npz"), output=str(out))) == 2
  assert message in capsys.readouterr().err
  assert not out.exists()


def test_generate_ignores_whatever_padding_holds(files, tmp_path):
  d, ref = files
  req = {k: ref["stage2_" + k].copy() for k in REQUEST}
  pad = req["attention_mask"] == 0
  assert pad.any()
  req["input_ids"][pad] = 5000  # a pad value outside the vocabulary: never embedded
  req["position_ids"][pad] = -1
  np.savez(tmp_path / "req.npz", **req)
  out = tmp_path / "o.npz"
  assert run(generate_args(d, batch=str(tmp_path / "req.npz"), output=str(out))) == 0
  with np.load(out) as f:
    logits = f["stage2_logits"]
  valid = ~pad
  np.testing.assert_allclose(logits[valid], ref["stage2_logits"][valid], atol=1e-5)


def test_request_validation_names_the_array_the_row_and_the_value():
  from msa_jax.engine.prefill import Request, RequestError
  ref = load_npz("fixture_inference.npz")
  req = {k: ref["stage2_" + k].copy() for k in REQUEST}
  req["input_ids"][0, 4] = 999
  Request.from_arrays(req)  # without a vocabulary only the sign is checked
  with pytest.raises(RequestError, match=r"input_ids\[0, 4\] = 999 is outside the vocabulary"):
    Request.from_arrays(req, vocab_size=VOCAB)
  req["input_ids"][0, 4] = -3
  with pytest.raises(RequestError, match=r"input_ids\[0, 4\] = -3 is outside the vocabulary"):
    Request.from_arrays(req)


def test_bank_runner_refuses_a_request_outside_the_models_vocabulary(files, official_model):
  from msa_jax.engine.prefill import Request, RequestError
  from msa_jax.engine.run import BankRunner
  from msa_jax.memory.store import open_bank
  from msa_jax.nn.model import from_params
  d, ref = files
  req = {k: ref["stage2_" + k].copy() for k in REQUEST}
  req["input_ids"][1, 7] = 4000
  runner = BankRunner(from_params(*official_model), open_bank(d / "bank"))
  with pytest.raises(RequestError, match=r"input_ids\[1, 7\] = 4000 is outside the vocabulary"):
    runner.generate(Request.from_arrays(req), 2)


@pytest.mark.parametrize("name,value,message", [
    ("input_ids", 5000, f"input_ids[0, 5] = 5000 is outside the vocabulary [0, {VOCAB})"),
    ("input_ids", -5, f"input_ids[0, 5] = -5 is outside the vocabulary [0, {VOCAB})"),
    ("position_ids", -5, "position_ids[0, 5] = -5 is negative"),
    ("labels", 5000, f"labels[0, 5] = 5000 is neither -100 (ignored) nor in the vocabulary"),
])
def test_forward_refuses_a_batch_token_outside_the_vocabulary_naming_row_and_value(
    tmp_path, capsys, name, value, message):
  batch = load_npz("fixture.npz")
  batch[name][0, 5] = value
  np.savez(tmp_path / "b.npz", **batch)
  out = tmp_path / "o.npz"
  assert run(forward_args(tmp_path, batch=str(tmp_path / "b.npz"))) == 2
  assert message in capsys.readouterr().err
  assert not out.exists()


def test_forward_ignores_whatever_padding_holds(tmp_path):
  batch = load_npz("fixture.npz")
  pad = batch["attention_mask"] == 0
  assert pad.any()
  batch["input_ids"][pad] = 5000
  np.savez(tmp_path / "b.npz", **batch)
  assert run(forward_args(tmp_path, batch=str(tmp_path / "b.npz"))) == 0
  with np.load(tmp_path / "o.npz") as f:
    logits = f["logits"]
  ref = load_npz("fixture.npz")
  np.testing.assert_allclose(logits[~pad], ref["logits"][~pad], atol=1e-5)


# --- defect 5: a bank without live documents is storable but cannot serve requests ------------

@pytest.fixture(scope="module")
def dead_banks(files):
  """Banks with no live documents: new and empty, all deleted, all deleted then compacted."""
  from msa_jax.interop import hf
  from msa_jax.memory.bank import BankSpec
  from msa_jax.memory.store import BankWriter, compact, delete_documents, open_bank
  d, _ = files
  spec = BankSpec.for_model(hf.read_config(CKPT))
  with BankWriter(d / "empty", spec):
    pass
  shutil.copytree(d / "bank", d / "all_deleted")
  delete_documents(d / "all_deleted", open_bank(d / "all_deleted").doc_ids.tolist())
  shutil.copytree(d / "all_deleted", d / "compacted")
  compact(d / "compacted")
  assert open_bank(d / "compacted").num_docs == 0
  return d


@pytest.mark.parametrize("bank", ["empty", "all_deleted", "compacted"])
def test_generate_refuses_a_bank_without_live_documents(dead_banks, capsys, bank):
  d = dead_banks
  assert run(generate_args(d, bank=str(d / bank))) == 2
  err = capsys.readouterr().err
  assert "no live documents" in err and "add documents" in err


@pytest.mark.parametrize("bank", ["empty", "all_deleted"])
def test_bank_runner_refuses_a_bank_without_live_documents(dead_banks, official_model, bank):
  from msa_jax.engine.run import BankRunner
  from msa_jax.memory.store import BankError, open_bank
  from msa_jax.nn.model import from_params
  with pytest.raises(BankError, match="no live documents"):
    BankRunner(from_params(*official_model), open_bank(dead_banks / bank))


# --- defect 6: plainly bad arguments and files ----------------------------------------------

@pytest.mark.parametrize("flag,value", [
    ("--max-new-tokens", "0"), ("--max-new-tokens", "-3"),
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-0.5"),
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"),
    ("--seed", str(2 ** 64)),
])
def test_generate_refuses_a_bad_number_at_argument_parsing(files, capsys, flag, value):
  d, _ = files
  argv = generate_args(d)
  if flag in argv:
    argv[argv.index(flag) + 1] = value
  else:
    argv += [flag, value]
  assert run(argv) == 2
  assert f"argument {flag}" in capsys.readouterr().err


def test_generate_refuses_more_new_tokens_than_the_model_has_positions(files, capsys):
  d, _ = files
  argv = generate_args(d)
  argv[argv.index("--max-new-tokens") + 1] = str(10 ** 9)
  assert run(argv) == 2
  assert "--max-new-tokens 1000000000 is more than the model's 512 positions" in (
      capsys.readouterr().err)


def test_generate_refuses_a_stop_token_outside_the_vocabulary(files, capsys):
  d, _ = files
  assert run(generate_args(d) + ["--stop-token", str(2 ** 40)]) == 2
  assert f"--stop-token {2 ** 40} is outside the vocabulary [0, {VOCAB})" in capsys.readouterr().err


def test_encode_refuses_zero_documents_per_shard(files, tmp_path, capsys):
  d, _ = files
  assert run(["encode", "--checkpoint", CKPT, "--documents", str(d / "docs.npz"), "--bank",
              str(tmp_path / "bank"), "--shard-docs", "0"]) == 2
  assert "argument --shard-docs" in capsys.readouterr().err
  assert not (tmp_path / "bank").exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated"])
@pytest.mark.parametrize("command", ["forward", "generate", "encode"])
def test_an_npz_that_is_not_one_is_named(files, tmp_path, capsys, no_compute, command, content):
  d, _ = files
  bad = tmp_path / "bad.npz"
  bad.write_bytes(content)
  argv = {"forward": forward_args(tmp_path, batch=str(bad)),
          "generate": generate_args(d, batch=str(bad)),
          "encode": ["encode", "--checkpoint", CKPT, "--documents", str(bad), "--bank",
                     str(tmp_path / "bank")]}[command]
  if command == "encode":  # documents are read after the model: its vocabulary checks them
    no_compute.undo()
  assert run(argv) == 2
  assert str(bad) in capsys.readouterr().err


def test_an_npy_given_for_an_npz_is_named(tmp_path, capsys, no_compute):
  bad = tmp_path / "batch.npz"
  with open(bad, "wb") as f:
    np.save(f, np.zeros(3))
  assert run(forward_args(tmp_path, batch=str(bad))) == 2
  assert f"{bad}: not an .npz archive" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["forward", "generate"])
@pytest.mark.parametrize("where", ["under_a_file", "a_directory"])
def test_an_unwritable_output_is_refused_before_any_compute(files, tmp_path, capsys, no_compute,
                                                            command, where):
  d, _ = files
  (tmp_path / "a_file").write_text("")
  out = {"under_a_file": tmp_path / "a_file" / "sub" / "o.npz", "a_directory": tmp_path}[where]
  argv = (forward_args(tmp_path, output=str(out)) if command == "forward"
          else generate_args(d, output=str(out)))
  assert run(argv) == 2
  err = capsys.readouterr().err
  assert f"--output {out}" in err
  assert ("is not a directory" if where == "under_a_file" else "is a directory") in err


def test_a_missing_reference_is_refused_before_any_compute(tmp_path, capsys, no_compute):
  ref = tmp_path / "missing.npz"
  assert run(forward_args(tmp_path, reference=str(ref))) == 2
  assert str(ref) in capsys.readouterr().err


@pytest.fixture
def ckpt_with(tmp_path):
  def make(**msa_config):
    ckpt = tmp_path / "ckpt"
    shutil.copytree(OFFICIAL / "ckpt", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["msa_config"].update(msa_config)
    (ckpt / "config.json").write_text(json.dumps(cfg))
    return ckpt
  return make


@pytest.mark.parametrize("command", ["forward", "encode"])
def test_a_config_value_of_the_wrong_type_names_config_json_and_the_field(
    files, tmp_path, capsys, ckpt_with, command):
  d, _ = files
  ckpt = ckpt_with(top_k_docs="two")
  argv = (forward_args(tmp_path, checkpoint=str(ckpt)) if command == "forward"
          else ["encode", "--checkpoint", str(ckpt), "--documents", str(d / "docs.npz"),
                "--bank", str(tmp_path / "bank")])
  assert run(argv) == 2
  err = capsys.readouterr().err
  assert str(ckpt / "config.json") in err and "top_k_docs='two'" in err


@pytest.mark.parametrize("path,value,message", [
    (("msa_config", "top_k_docs"), "two", "msa_config.top_k_docs='two': expected an integer"),
    (("msa_config", "top_k_docs"), 2.5, "msa_config.top_k_docs=2.5: expected an integer"),
    (("msa_config", "pooling_kernel_size"), None, "pooling_kernel_size=None: expected an integer"),
    (("msa_config", "decouple_router"), "false", "decouple_router='false': expected true or false"),
    (("msa_config", "infonce_loss_temp"), "warm", "infonce_loss_temp='warm': expected a number"),
    (("msa_config", "auxloss_weight"), math.nan, "auxloss_weight=nan: expected a finite number"),
    (("msa_config", "router_layer_idx"), [2, "x"], "router_layer_idx=[2, 'x']"),
    (("msa_config",), "2,3", "msa_config='2,3': expected an object"),
    (("vocab_size",), "big", "vocab_size='big': expected an integer"),
    (("hidden_size",), [64], "hidden_size=[64]: expected an integer"),
    (("num_attention_heads",), True, "num_attention_heads=True: expected an integer"),
    (("rms_norm_eps",), "tiny", "rms_norm_eps='tiny': expected a number"),
    (("tie_word_embeddings",), "no", "tie_word_embeddings='no': expected true or false"),
])
def test_config_values_of_the_wrong_type_are_config_errors_naming_the_field(path, value, message):
  from msa_jax import config as C
  d = json.loads((OFFICIAL / "ckpt" / "config.json").read_text())
  target = d
  for p in path[:-1]:
    target = target[p]
  target[path[-1]] = value
  with pytest.raises(C.ConfigError) as e:
    C.from_hf_dict(d)
  assert message in str(e.value)


def test_loosely_typed_official_values_still_read():
  from msa_jax import config as C
  d = json.loads((OFFICIAL / "ckpt" / "config.json").read_text())
  d["msa_config"].update(top_k_docs="2", pooling_kernel_size=4.0, infonce_loss_temp=1)
  m = C.from_hf_dict(d).msa
  assert (m.top_k_docs, m.pooling_size, m.aux_temperature) == (2, 4, 1.0)


def _jsonl(tmp_path) -> str:
  (tmp_path / "docs.jsonl").write_text('{"text": "a b"}\n')
  return str(tmp_path / "docs.jsonl")


@pytest.mark.parametrize("tokenizer", ["missing.json", "not_json.json"])
def test_a_bad_tokenizer_file_is_named(tmp_path, capsys, tokenizer):
  (tmp_path / "not_json.json").write_text("{ not json")
  path = str(tmp_path / tokenizer)
  assert run(["encode", "--checkpoint", CKPT, "--documents", _jsonl(tmp_path), "--tokenizer", path,
              "--bank", str(tmp_path / "bank")]) == 2
  assert f"cannot read --tokenizer {path}" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    (b'{"text": 5}\n', ':1: "text" must be a string'),
    (b'\xff\xfe{"text": "a"}\n', "not valid UTF-8 at byte offset 0"),
])
def test_bad_jsonl_documents_are_named(tmp_path, capsys, content, message):
  from tokenizers import Tokenizer, models, pre_tokenizers
  tok = Tokenizer(models.WordLevel({"a": 1, "[UNK]": 0}, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / "tokenizer.json"))
  docs = tmp_path / "docs.jsonl"
  docs.write_bytes(content)
  assert run(["encode", "--checkpoint", CKPT, "--documents", str(docs), "--tokenizer",
              str(tmp_path / "tokenizer.json"), "--bank", str(tmp_path / "bank")]) == 2
  err = capsys.readouterr().err
  assert str(docs) in err and message in err


def test_documents_that_are_not_a_token_matrix_are_refused(tmp_path, capsys):
  np.savez(tmp_path / "docs.npz", tokens=np.array(5), lengths=np.array(1))
  assert run(["encode", "--checkpoint", CKPT, "--documents", str(tmp_path / "docs.npz"), "--bank",
              str(tmp_path / "bank")]) == 2
  assert "documents must be tokens [M, Lmax] with lengths [M]" in capsys.readouterr().err


def test_a_reference_array_that_is_not_numeric_is_reported_not_a_crash(tmp_path, capsys):
  ref = tmp_path / "ref.npz"
  np.savez(ref, logits=np.full(load_npz("fixture.npz")["logits"].shape, "x"))
  assert run(forward_args(tmp_path, reference=str(ref))) == 0
  assert "logits: reference dtype <U1 is not numeric" in capsys.readouterr().out
