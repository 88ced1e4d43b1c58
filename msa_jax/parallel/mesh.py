"""The `memory` device mesh and the few jax.sharding helpers Memory Parallel needs.

One mesh axis, `memory`, spans the devices that hold shards of the bank (SPEC §9): routing keys
(and device-resident content) are sharded along it, model weights are replicated over it. The
same code runs on one device, on several devices of one process and on the devices of several
processes (`jax.distributed`); devices are ordered by process, so each process's devices form one
contiguous run of the axis.

Version notes: `jax.make_mesh` defaults to Explicit axes from jax 0.10 on, under which scatter ops
on sharded operands need an out_sharding; the memory mesh is built with Auto axes (everything
sharded runs inside `shard_map` anyway). `jax.shard_map` (jax >= 0.7) replaces
`jax.experimental.shard_map.shard_map`; `shard_map` below picks what the installed jax has.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MEMORY = "memory"  # the mesh axis the bank is sharded along


def _ordered_devices(devices: Sequence[jax.Device] | None) -> list[jax.Device]:
  devices = list(jax.devices() if devices is None else devices)
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def make_memory_mesh(num_devices: int | None = None, *,
                     devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis `memory` over `devices` (default: every device of every process).

  num_devices: use only the first n devices (by process, then id). With several processes the
    mesh must span all of them, so n must then be the global device count.
  """
  devs = _ordered_devices(devices)
  if num_devices is not None:
    if not 1 <= num_devices <= len(devs):
      raise ValueError(f"num_devices={num_devices}: there are {len(devs)} devices")
    if jax.process_count() > 1 and num_devices != len(devs):
      raise ValueError(f"num_devices={num_devices}: a multi-process memory mesh must span all "
                       f"{len(devs)} devices")
    devs = devs[:num_devices]
  arr = np.array(devs, dtype=object)
  axis_type = getattr(jax.sharding, "AxisType", None)
  if axis_type is not None:
    try:
      return Mesh(arr, (MEMORY,), axis_types=(axis_type.Auto,))
    except TypeError:  # an AxisType without the keyword (transition versions)
      pass
  return Mesh(arr, (MEMORY,))


def local_mesh() -> Mesh:
  """A memory mesh over this process's own devices (for per-process work such as encoding)."""
  return make_memory_mesh(devices=jax.local_devices())


def mesh_size(mesh: Mesh) -> int:
  return int(mesh.shape[MEMORY])


def process_runs(mesh: Mesh) -> list[tuple[int, int]]:
  """(process index, devices) for each contiguous run of one process's devices along the axis.

  Raises if a process's devices are not contiguous or processes are out of order: the bank is
  the concatenation of the processes' local banks in process order.
  """
  runs: list[list[int]] = []
  for d in mesh.devices.reshape(-1):
    if runs and runs[-1][0] == d.process_index:
      runs[-1][1] += 1
    else:
      runs.append([d.process_index, 1])
  procs = [p for p, _ in runs]
  if procs != sorted(set(procs)):
    raise ValueError(f"the memory mesh's devices must be grouped by process in ascending order, "
                     f"got process runs {procs}")
  return [(p, n) for p, n in runs]


def shard_map(f: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
  """`jax.shard_map` over `mesh` (replication checks off: outputs are made equal by collectives)."""
  if hasattr(jax, "shard_map"):
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
  from jax.experimental.shard_map import shard_map as legacy  # jax < 0.7
  return legacy(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False)


def global_array(mesh: Mesh, spec: P, shape: tuple[int, ...], dtype,
                 shard_data: Callable[[tuple[slice, ...]], np.ndarray]) -> jax.Array:
  """A global array with sharding `spec` whose addressable pieces are `shard_data(index)`.

  Only this process's pieces are asked for, so each process reads only the part of the bank its
  devices hold (works the same with one or many processes).
  """
  return jax.make_array_from_callback(
      shape, NamedSharding(mesh, spec),
      lambda idx: np.asarray(shard_data(idx), dtype=dtype, order="C"), dtype=dtype)


def replicated(mesh: Mesh, a) -> jax.Array:
  """A host array (the same on every process) replicated on every device of the mesh."""
  a = np.asarray(a)
  return global_array(mesh, P(), a.shape, a.dtype, lambda idx: a[idx])


def replicate_model(model, mesh: Mesh):
  """A copy of an NNX model whose weights are replicated on every device of the mesh."""
  from flax import nnx
  graphdef, state = nnx.split(model)
  return nnx.merge(graphdef, replicate(state, mesh))


def replicate(tree, mesh: Mesh):
  """Every array leaf of `tree` (e.g. model weights) replicated over the mesh."""
  sharding = NamedSharding(mesh, P())
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda x: replicated(mesh, np.asarray(jax.device_get(x))), tree)
