"""`msa-jax forward` writes SPEC §13 outputs that match the official run; bad input exits 2."""

import shutil

import numpy as np
import pytest

from conftest import OFFICIAL, load_npz
from msa_jax import cli


def test_forward_writes_the_spec_names_and_matches_the_official_run(tmp_path, capsys):
  out = tmp_path / "out.npz"
  rc = cli.main(["forward", "--checkpoint", str(OFFICIAL / "ckpt"), "--batch",
                 str(OFFICIAL / "fixture.npz"), "--output", str(out), "--reference",
                 str(OFFICIAL / "fixture.npz")])
  assert rc == 0
  with np.load(out) as f:
    got = dict(f)
  assert set(got) == {"logits", "doc_scores_L2", "doc_scores_L3", "selected_docs_L2",
                      "selected_docs_L3", "loss", "lm_loss", "aux_loss", "answer_loss",
                      "reconstruction_loss"}
  ref = load_npz("fixture.npz")
  valid = ref["attention_mask"].astype(bool)
  assert got["logits"].dtype == np.float32
  np.testing.assert_allclose(got["logits"][valid], ref["logits"][valid], atol=1e-5)
  np.testing.assert_array_equal(got["selected_docs_L3"], ref["selected_docs_L3"])
  printed = capsys.readouterr().out
  assert "selected_docs_L2: identical" in printed and "logits: max|diff|" in printed
  assert not list(tmp_path.glob(".*tmp"))  # the atomic write left nothing behind


def test_forward_without_labels_writes_no_losses(tmp_path):
  ref = load_npz("fixture_partial_nodecouple.npz")
  batch = tmp_path / "batch.npz"
  np.savez(batch, **{k: ref[k] for k in ("input_ids", "doc_ids", "attention_mask", "position_ids")})
  assert cli.main(["forward", "--checkpoint", str(OFFICIAL / "ckpt_nodecouple"), "--batch",
                   str(batch), "--output", str(tmp_path / "o.npz")]) == 0
  with np.load(tmp_path / "o.npz") as f:
    assert "loss" not in f.files and f["selected_docs_L2"].tolist() == [[3, 2], [2, 1]]


def test_a_broken_checkpoint_exits_2_naming_the_tensor(tmp_path, capsys):
  from safetensors.numpy import load_file, save_file
  ckpt = tmp_path / "ckpt"
  shutil.copytree(OFFICIAL / "ckpt", ckpt)
  tensors = load_file(ckpt / "model.safetensors")
  del tensors["model.layers.1.mlp.up_proj.weight"]
  save_file(tensors, ckpt / "model.safetensors")
  out = tmp_path / "o.npz"
  rc = cli.main(["forward", "--checkpoint", str(ckpt), "--batch", str(OFFICIAL / "fixture.npz"),
                 "--output", str(out)])
  assert rc == 2 and not out.exists()
  assert "model.layers.1.mlp.up_proj.weight" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [(b"not an npz", "cannot read batch")])
def test_an_unreadable_batch_exits_2(tmp_path, capsys, content, message):
  bad = tmp_path / "bad.npz"
  bad.write_bytes(content)
  assert cli.main(["forward", "--checkpoint", str(OFFICIAL / "ckpt"), "--batch", str(bad),
                   "--output", str(tmp_path / "o.npz")]) == 2
  assert message in capsys.readouterr().err


def test_a_batch_with_bad_document_ids_exits_2(tmp_path, capsys):
  ref = load_npz("fixture.npz")
  ref["doc_ids"][0, 3:11] = 2  # document 1 renamed 2: ids no longer 1..n
  batch = tmp_path / "b.npz"
  np.savez(batch, **ref)
  assert cli.main(["forward", "--checkpoint", str(OFFICIAL / "ckpt"), "--batch", str(batch),
                   "--output", str(tmp_path / "o.npz")]) == 2
  assert "row 0: document ids must be contiguous" in capsys.readouterr().err
