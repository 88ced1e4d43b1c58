"""Checkpoint integrity: our saves record a checksum of the weights that loading verifies, and no
checkpoint with a NaN or Inf weight loads (HF safetensors or Orbax); a damaged one makes
`msa-jax forward` exit 2."""

import hashlib
import json
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from conftest import OFFICIAL
from msa_jax import cli
from msa_jax.interop import hf
from msa_jax.interop import orbax as orbax_io

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
Q_PROJ_PATH = ("layers", 0, "attn", "q_proj", "kernel")


def _header(path) -> tuple[dict, int]:
  """(the safetensors header as a dict, offset of the data section) of a file."""
  data = path.read_bytes()
  n = struct.unpack("<Q", data[:8])[0]
  return json.loads(data[8:8 + n]), 8 + n


def _with_values(params, path, edit):
  """A copy of `params` whose leaf at `path` is replaced by `edit(copy of the leaf)`."""
  params = jax.tree.map(lambda x: x, params)  # new dicts, same leaves
  tree = params
  for p in path[:-1]:
    tree = tree[p]
  value = np.array(tree[path[-1]])
  edit(value)
  tree[path[-1]] = value
  return params


@pytest.fixture
def saved(official_model, tmp_path):
  """The official model as written by save_checkpoint."""
  hf.save_checkpoint(tmp_path / "ckpt", *official_model)
  return tmp_path / "ckpt"


def _flip_byte(path, where: float):
  """Flips the low bit of one byte of the data section (not the header), `where` in [0, 1]."""
  _, start = _header(path)
  data = bytearray(path.read_bytes())
  i = start + int(where * (len(data) - 1 - start))
  data[i] ^= 0x01
  path.write_bytes(bytes(data))


# --- the checksum our saves record ---------------------------------------------------------------


def test_the_checksum_is_sha256_over_sorted_name_dtype_shape_lines_and_raw_bytes():
  a = np.arange(3, dtype=np.float32)
  b = np.ones((2, 1), ml_dtypes.bfloat16)
  want = hashlib.sha256(b'["a","float32",[3]]\n' + a.tobytes()
                        + b'["b","bfloat16",[2,1]]\n' + b.tobytes()).hexdigest()
  assert hf.tensors_sha256({"b": b, "a": a}) == want  # insertion order does not matter
  assert hf.tensors_sha256({"a": a, "b": b.reshape(1, 2)}) != want  # nor is the shape ignored


def test_a_saved_checkpoint_records_the_checksum_of_its_weights_and_loads(saved, official_model):
  metadata = _header(saved / "model.safetensors")[0]["__metadata__"]
  assert metadata == {"format": "pt", "msa_jax.checksum": "sha256-tensors-v1",
                      "msa_jax.sha256": hf.tensors_sha256(load_file(saved / "model.safetensors"))}
  cfg, params = hf.load_checkpoint(saved)
  assert cfg == official_model[0]
  jax.tree.map(np.testing.assert_array_equal, params, official_model[1])


@pytest.mark.parametrize("where", [0.0, 0.5, 1.0])
def test_a_flipped_byte_in_the_weights_is_refused_as_damage(saved, where):
  _flip_byte(saved / "model.safetensors", where)
  damaged = (r"model.safetensors: checksum mismatch: the weights differ from what was saved "
             r"\(file damaged\)")
  with pytest.raises(hf.CheckpointError, match=damaged):
    hf.load_checkpoint(saved)


@pytest.mark.parametrize("metadata, match", [
    ({"msa_jax.checksum": "sha256-tensors-v1", "msa_jax.sha256": "abc123"},
     r"malformed checksum in header metadata 'msa_jax.sha256': 'abc123' is not 64 hex digits"),
    ({"msa_jax.checksum": "sha256-tensors-v1", "msa_jax.sha256": "g" * 64},
     r"malformed checksum .* is not 64 hex digits"),
    ({"msa_jax.checksum": "sha256-tensors-v1"}, r"'msa_jax.sha256' \(the checksum\) is missing"),
    ({"msa_jax.sha256": "0" * 64}, r"'msa_jax.checksum' is missing, expected 'sha256-tensors-v1'"),
    ({"msa_jax.checksum": "sha512-v9", "msa_jax.sha256": "0" * 64},
     r"'msa_jax.checksum' is 'sha512-v9', expected 'sha256-tensors-v1'; cannot verify"),
])
def test_a_malformed_checksum_record_is_refused(saved, metadata, match):
  f = saved / "model.safetensors"
  save_file(load_file(f), f, metadata={"format": "pt", **metadata})
  with pytest.raises(hf.CheckpointError, match=match):
    hf.load_checkpoint(saved)


def test_an_official_checkpoint_without_a_checksum_still_loads(official_model):
  assert "msa_jax.sha256" not in _header(OFFICIAL / "ckpt" / "model.safetensors")[0].get(
      "__metadata__", {})
  cfg, params = hf.load_checkpoint(OFFICIAL / "ckpt")
  assert cfg == official_model[0]
  jax.tree.map(np.testing.assert_array_equal, params, official_model[1])


def test_each_shard_of_a_sharded_checkpoint_is_verified(saved):
  tensors = load_file(saved / "model.safetensors")
  (saved / "model.safetensors").unlink()
  keys = sorted(tensors)
  for i, part in enumerate((keys[::2], keys[1::2])):
    shard = {k: tensors[k] for k in part}
    save_file(shard, saved / f"model-0000{i + 1}-of-00002.safetensors",
              metadata={"msa_jax.checksum": "sha256-tensors-v1",
                        "msa_jax.sha256": hf.tensors_sha256(shard)})
  hf.load_checkpoint(saved)
  _flip_byte(saved / "model-00002-of-00002.safetensors", 0.5)
  with pytest.raises(hf.CheckpointError, match=r"model-00002-of-00002.safetensors: checksum "
                                               r"mismatch"):
    hf.load_checkpoint(saved)


# --- NaN / Inf weights ---------------------------------------------------------------------------


def _three_nans(kernel):
  kernel[0, :3] = np.nan


@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_a_nan_weight_saved_by_save_checkpoint_is_refused_naming_it(official_model, tmp_path,
                                                                    dtype):
  cfg, params = official_model
  params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
  hf.save_checkpoint(tmp_path, cfg, _with_values(params, Q_PROJ_PATH, _three_nans))
  with pytest.raises(hf.CheckpointError, match=rf"model.safetensors: tensor '{Q_PROJ}' holds 3 "
                                               r"non-finite values \(NaN/Inf\)$"):
    hf.load_checkpoint(tmp_path)


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_an_inf_weight_in_a_file_without_a_checksum_is_refused(tmp_path, dtype):
  shutil.copy(OFFICIAL / "ckpt" / "config.json", tmp_path)
  official = load_file(OFFICIAL / "ckpt" / "model.safetensors")
  tensors = {k: v.astype(dtype) for k, v in official.items()}
  tensors["model.norm.weight"][[1, 5]] = [np.inf, -np.inf]
  tensors[Q_PROJ][2, 2] = np.nan
  save_file(tensors, tmp_path / "model.safetensors")  # no metadata at all
  with pytest.raises(hf.CheckpointError, match=r"tensor 'model.layers.0.self_attn.q_proj.weight' "
                                               r"holds 1 non-finite values \(NaN/Inf\); 1 more "
                                               r"tensors hold some too"):
    hf.load_checkpoint(tmp_path)


@pytest.mark.parametrize("sharded", [False, True])
def test_orbax_params_with_a_nan_are_refused_naming_the_leaf(official_model, tmp_path, sharded):
  orbax_io.save_params(tmp_path / "p", _with_values(official_model[1], Q_PROJ_PATH, _three_nans))
  sharding = None
  if sharded:  # the kernel split over two devices: counted where its halves live
    mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x", None))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    sharding = lambda path, x: split if path == Q_PROJ_PATH else replicated
  with pytest.raises(hf.CheckpointError, match=r"tensor 'layers/0/attn/q_proj/kernel' holds 3 "
                                               r"non-finite values \(NaN/Inf\)"):
    orbax_io.load_params(tmp_path / "p", sharding=sharding)


# --- the command line ----------------------------------------------------------------------------


def test_forward_runs_on_a_saved_checkpoint_and_exits_2_once_a_byte_flips(saved, tmp_path, capsys):
  def forward(out):
    return cli.main(["forward", "--checkpoint", str(saved), "--batch",
                     str(OFFICIAL / "fixture.npz"), "--output", str(out)])

  assert forward(tmp_path / "before.npz") == 0
  _flip_byte(saved / "model.safetensors", 0.5)
  assert forward(tmp_path / "after.npz") == 2 and not (tmp_path / "after.npz").exists()
  assert "model.safetensors: checksum mismatch" in capsys.readouterr().err


def test_a_saved_file_depends_only_on_its_contents(tmp_path):
  """safetensors keeps metadata in a hash map: its order varies by process unless we fix it."""
  import subprocess
  import sys
  code = ("import sys; from msa_jax.interop import hf; "
          "hf.save_checkpoint(sys.argv[1], *hf.load_checkpoint(sys.argv[2]))")
  for name in ("a", "b", "c"):
    subprocess.run([sys.executable, "-c", code, str(tmp_path / name), str(OFFICIAL / "ckpt")],
                   check=True)
  files = [(tmp_path / n / "model.safetensors").read_bytes() for n in "abc"]
  assert files[0] == files[1] == files[2]
  n = int.from_bytes(files[0][:8], "little")
  header = json.loads(files[0][8:8 + n])
  assert list(header["__metadata__"]) == sorted(header["__metadata__"])
  assert n % 8 == 0
