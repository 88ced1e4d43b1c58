"""msa-jax params <-> an Orbax checkpoint directory, restorable onto any sharding.

Params are the plain nested dict of `nnx.to_pure_dict` (the same tree `hf.load_checkpoint`
returns). Its `layers` level has integer keys; Orbax stores keys as strings, so integer keys are
written as decimal strings and turned back into integers on restore. A string key that looks like
an integer would come back as one, so `save_params` refuses it.

Single-controller (one JAX process); a multi-host save needs every process to call Orbax.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import uuid
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp

from msa_jax.interop.hf import check_finite

Params = dict[str, Any]
KeyPath = tuple[str | int, ...]
# One sharding for every leaf, a nested dict of shardings shaped like the params, or
# fn(key path, jax.ShapeDtypeStruct) -> sharding.
ShardingSpec = (jax.sharding.Sharding | Mapping[str | int, Any]
                | Callable[[KeyPath, jax.ShapeDtypeStruct], jax.sharding.Sharding])


def _checkpointer() -> ocp.Checkpointer:
  """A synchronous checkpointer: `save` returns once the checkpoint is committed."""
  return ocp.Checkpointer(ocp.StandardCheckpointHandler())


def _encode(tree: Mapping, path: KeyPath = ()) -> dict[str, Any]:
  """Params -> the tree Orbax stores: integer keys as decimal strings."""
  out = {}
  for k, v in tree.items():
    if isinstance(k, bool) or not isinstance(k, (int, str)):
      raise TypeError(f"params key {(*path, k)} must be a str or an int, got {type(k).__name__}")
    if isinstance(k, str) and k.isdigit():
      raise ValueError(f"params key {(*path, k)} is a string of digits, which would be restored "
                       "as an int; use an int key or a non-numeric name")
    if isinstance(v, Mapping):
      out[str(k)] = _encode(v, (*path, k))
    elif isinstance(v, (jax.Array, jax.ShapeDtypeStruct)) or hasattr(v, "__array__"):
      out[str(k)] = v
    else:
      raise TypeError(f"params leaf {(*path, k)} must be an array, got {type(v).__name__}")
  return out


def _decode(tree: Mapping[str, Any]) -> Params:
  """The stored tree -> params: decimal-string keys back to ints."""
  return {int(k) if k.isdigit() else k: _decode(v) if isinstance(v, Mapping) else v
          for k, v in tree.items()}


def save_params(path: str | os.PathLike, params: Params, *, overwrite: bool = False) -> None:
  """Saves `params` (a nested dict of arrays) to the directory `path`.

  Orbax writes into a temporary directory and renames it when complete, so `path` is either the
  whole checkpoint or absent. An existing `path` is an error unless `overwrite=True`; then the new
  checkpoint is written beside it first and swapped in only once committed, so a failed save
  leaves the previous checkpoint as it was.
  """
  path = pathlib.Path(path).absolute()
  tree = _encode(params)
  if path.exists() and not overwrite:
    raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
  path.parent.mkdir(parents=True, exist_ok=True)
  tag = uuid.uuid4().hex[:8]
  staging = path.with_name(f".{path.name}.new-{tag}")
  try:
    with _checkpointer() as ckptr:
      ckptr.save(staging, args=ocp.args.StandardSave(tree))
    if path.exists():  # overwrite: swap, keeping the old one until the new one is in place
      old = path.with_name(f".{path.name}.old-{tag}")
      os.replace(path, old)
      try:
        os.replace(staging, path)
      except BaseException:
        os.replace(old, path)
        raise
      shutil.rmtree(old)
    else:
      os.replace(staging, path)
  finally:
    for leftover in path.parent.glob(f".{path.name}.new-{tag}*"):
      shutil.rmtree(leftover, ignore_errors=True)


def _stored_tree(ckptr: ocp.Checkpointer, path: pathlib.Path) -> dict[str, Any]:
  """Shape/dtype metadata of every stored leaf, as a nested dict with the stored (string) keys."""
  meta = ckptr.metadata(path).item_metadata
  if meta is None:
    raise ValueError(f"{path} is not an Orbax params checkpoint (no item metadata)")
  return dict(meta.tree)


def _resolve_shardings(sharding: ShardingSpec | None, shapes: Params) -> Params:
  """A sharding per leaf of `shapes` (params-shaped tree of jax.ShapeDtypeStruct)."""
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  if isinstance(sharding, jax.sharding.Sharding):
    return jax.tree.map(lambda _: sharding, shapes)
  if callable(sharding):
    return jax.tree_util.tree_map_with_path(
        lambda kp, x: sharding(tuple(k.key for k in kp), x), shapes)  # dict keys only
  if isinstance(sharding, Mapping):
    want, got = jax.tree.structure(shapes), jax.tree.structure(
        sharding, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    if want != got:
      raise ValueError(f"the sharding tree does not match the stored params:\n  stored: {want}\n"
                       f"  sharding: {got}")
    return sharding
  raise TypeError(f"sharding must be a Sharding, a tree of them or a callable, got "
                  f"{type(sharding).__name__}")


def load_params(path: str | os.PathLike, *, sharding: ShardingSpec | None = None) -> Params:
  """Restores params saved by `save_params`, each leaf with its stored shape and dtype.

  sharding: None puts every leaf on the default device; a `jax.sharding.Sharding` is used for
  every leaf; a nested dict of shardings shaped like the params gives one per leaf; a callable
  `fn(key_path, jax.ShapeDtypeStruct) -> Sharding` picks one per leaf (key_path as in params,
  e.g. `("layers", 0, "attn", "q_proj", "kernel")`). The stored sharding is not reused, so a
  checkpoint restores onto any device layout. A leaf holding NaN or Inf is an `hf.CheckpointError`
  (a ValueError) naming it.
  """
  path = pathlib.Path(path).absolute()
  if not path.is_dir():
    raise FileNotFoundError(f"{path} does not exist")
  with _checkpointer() as ckptr:
    stored = _stored_tree(ckptr, path)
    shapes = _decode(jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), stored))
    shardings = _resolve_shardings(sharding, shapes)
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)
    restored = ckptr.restore(path, args=ocp.args.StandardRestore(_encode(target)))
  params = _decode(restored)
  # Counted where the leaves live, so a sharded restore is not gathered onto one device.
  check_finite({"/".join(str(k.key) for k in kp): x
                for kp, x in jax.tree_util.tree_leaves_with_path(params)}, path)
  return params
