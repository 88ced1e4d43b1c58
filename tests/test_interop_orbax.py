"""Params <-> Orbax: exact round trip, integer `layers` keys, restore onto another sharding."""

import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from msa_jax.interop import orbax as orbax_io

EMBED = ("embed", "embedding")


@pytest.fixture(scope="module")
def params(official_model):
  return official_model[1]


@pytest.fixture(scope="module")
def saved(params, tmp_path_factory):
  """The official params, on device 0, saved once for the restore tests."""
  assert len(jax.devices()) == 2, "tests/conftest.py should give two CPU devices"
  path = tmp_path_factory.mktemp("orbax") / "params"
  orbax_io.save_params(path, jax.device_put(params, jax.devices()[0]))
  return path


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))


def _vocab_sharded(mesh):
  """Embedding split over its vocab axis across the two devices; everything else replicated."""
  split, replicated = NamedSharding(mesh, P("x", None)), NamedSharding(mesh, P())
  return lambda path, x: split if path == EMBED else replicated


def _assert_equal_params(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
    assert (a.dtype, a.shape) == (b.dtype, b.shape), path
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_roundtrip_keeps_structure_keys_and_values(saved, params):
  restored = orbax_io.load_params(saved)
  assert sorted(restored["layers"]) == [0, 1, 2, 3]  # integer keys, as nnx.to_pure_dict gives
  _assert_equal_params(restored, params)
  leaf = restored["layers"][2]["attn"]["router_q_proj"]["kernel"]
  assert leaf.sharding == SingleDeviceSharding(jax.devices()[0])


def test_restore_onto_a_two_device_mesh(saved, params, mesh):
  restored = orbax_io.load_params(saved, sharding=_vocab_sharded(mesh))
  _assert_equal_params(restored, params)
  embed = restored["embed"]["embedding"]
  assert embed.sharding == NamedSharding(mesh, P("x", None))
  assert {s.data.shape for s in embed.addressable_shards} == {(160, 64)}
  assert {s.device for s in embed.addressable_shards} == set(jax.devices())
  kernel = restored["layers"][0]["mlp"]["up_proj"]["kernel"]
  assert kernel.sharding == NamedSharding(mesh, P())
  assert {s.data.shape for s in kernel.addressable_shards} == {(64, 128)}


def test_restore_with_a_tree_of_shardings(saved, params, mesh):
  shardings = jax.tree_util.tree_map_with_path(
      lambda kp, x: _vocab_sharded(mesh)(tuple(k.key for k in kp), x), params)
  restored = orbax_io.load_params(saved, sharding=shardings)
  _assert_equal_params(restored, params)
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert got.sharding == want


def test_sharded_save_restores_onto_one_device(params, mesh, tmp_path):
  shardings = jax.tree_util.tree_map_with_path(
      lambda kp, x: _vocab_sharded(mesh)(tuple(k.key for k in kp), x), params)
  sharded = jax.device_put(params, shardings)
  assert len(sharded["embed"]["embedding"].sharding.device_set) == 2
  orbax_io.save_params(tmp_path / "p", sharded)
  one = SingleDeviceSharding(jax.devices()[1])
  restored = orbax_io.load_params(tmp_path / "p", sharding=one)
  _assert_equal_params(restored, params)
  assert all(x.sharding == one for x in jax.tree.leaves(restored))


def test_bf16_and_scalar_leaves(tmp_path):
  tree = {"layers": {0: {"w": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3)}},
          "temperature": jnp.asarray(0.1, jnp.float32)}
  orbax_io.save_params(tmp_path / "p", tree)
  restored = orbax_io.load_params(tmp_path / "p")
  assert restored["layers"][0]["w"].dtype == ml_dtypes.bfloat16
  assert restored["temperature"].shape == ()
  _assert_equal_params(restored, tree)


def test_existing_directory_needs_overwrite(saved, params, tmp_path):
  path = tmp_path / "p"
  orbax_io.save_params(path, params)
  with pytest.raises(FileExistsError, match=r"already exists; pass overwrite=True"):
    orbax_io.save_params(path, params)
  doubled = jax.tree.map(lambda x: x * 2, params)
  orbax_io.save_params(path, doubled, overwrite=True)
  _assert_equal_params(orbax_io.load_params(path), doubled)
  assert os.listdir(tmp_path) == ["p"]  # no staging or old copies left behind


def test_failed_overwrite_keeps_the_old_checkpoint(params, tmp_path, monkeypatch):
  path = tmp_path / "p"
  orbax_io.save_params(path, params)
  before = sorted(p.relative_to(path) for p in path.rglob("*"))

  handler_save = orbax_io.ocp.StandardCheckpointHandler.save

  def broken_save(self, directory, *args, **kwargs):  # writes the arrays, then fails
    handler_save(self, directory, *args, **kwargs)
    raise OSError("disk full (simulated)")

  monkeypatch.setattr(orbax_io.ocp.StandardCheckpointHandler, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    orbax_io.save_params(path, jax.tree.map(lambda x: x * 2, params), overwrite=True)
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ["p"]
  assert sorted(p.relative_to(path) for p in path.rglob("*")) == before
  _assert_equal_params(orbax_io.load_params(path), params)


def test_digit_string_keys_are_refused(tmp_path):
  with pytest.raises(ValueError, match=r"params key \('layers', '0'\) is a string of digits"):
    orbax_io.save_params(tmp_path / "p", {"layers": {"0": jnp.zeros(2)}})
  assert not (tmp_path / "p").exists()


def test_non_array_leaf_is_refused(tmp_path):
  with pytest.raises(TypeError, match=r"params leaf \('scale',\) must be an array, got str"):
    orbax_io.save_params(tmp_path / "p", {"scale": "big"})


def test_missing_checkpoint(tmp_path):
  with pytest.raises(FileNotFoundError, match=r"does not exist"):
    orbax_io.load_params(tmp_path / "nothing")


def test_sharding_tree_must_match(saved, mesh):
  with pytest.raises(ValueError, match=r"sharding tree does not match the stored params"):
    orbax_io.load_params(saved, sharding={"embed": {"embedding": NamedSharding(mesh, P())}})


def test_directory_that_is_not_a_checkpoint(tmp_path):
  with pytest.raises(ValueError, match=r"is not an Orbax params checkpoint"):
    orbax_io.load_params(tmp_path)
