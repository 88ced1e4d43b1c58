"""Memory Parallel: the bank sharded over a device mesh selects and generates exactly what one
device does — on the 2 simulated devices of the test process, on 4 (a subprocess) and across 2
processes with `jax.distributed` (a subprocess pair); banks reopen on any device count.

Run as a script (`python tests/test_parallel.py WORKER ...`) this file is the subprocess worker.
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from msa_jax import parallel
from msa_jax.config import ChunkReduce, HeadReduce, ModelConfig, MSAConfig, QueryReduce
from msa_jax.engine import decode, encode, prefill
from msa_jax.engine.run import BankRunner, ContentPath
from msa_jax.interop import hf
from msa_jax.memory import store
from msa_jax.memory.bank import BankSpec, MemoryBank
from msa_jax.memory.index import DeviceContent, RoutingIndex
from msa_jax.nn.model import from_params
from msa_jax.parallel.placement import balanced_split, plan_shards

P = 4  # pooling size: documents of 1 .. 40 tokens have 1 .. 10 chunks
REQUEST = ("input_ids", "doc_ids", "attention_mask", "position_ids")


def small_cfg(top_k: int = 3, **msa) -> ModelConfig:
  return ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                     num_heads=4, num_kv_heads=2, head_dim=8, rope_theta=10000.0,
                     msa=MSAConfig(top_k_docs=top_k, pooling_size=P, router_layers=(1, 2), **msa))


def small_model(seed: int = 0):
  """A random model: 3 layers (routers 1, 2), 4 query / 2 kv heads of 8, P = 4, top-3."""
  cfg = small_cfg()
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda p: jnp.asarray(rng.normal(0, 0.3, p.shape) if p.shape else 0.1,
                                              jnp.float32), hf.abstract_params(cfg))
  return from_params(cfg, params)


def random_docs(m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """m documents of 1 .. 40 tokens (both extremes always present). Lengths are drawn from 1..4
  and 33..40 only: two encoding buckets, two compiles."""
  rng = np.random.default_rng(seed)
  lengths = np.where(rng.random(m) < 0.5, rng.integers(1, 5, m), rng.integers(33, 41, m))
  lengths[0], lengths[m // 2] = 40, 1
  return rng.integers(1, 64, (m, 40)), lengths


def synthetic_bank(cfg: ModelConfig, lengths, seed: int, dead=()) -> MemoryBank:
  """A bank with random unit routing keys and random content (no encoding: fast)."""
  from msa_jax.memory.bank import EncodedDocs
  rng = np.random.default_rng(seed)
  c = int(np.sum(-(-np.asarray(lengths) // P)))
  shape = (c, cfg.num_kv_heads, cfg.head_dim)

  def unit():
    a = rng.normal(size=shape).astype(np.float32)
    return a / np.linalg.norm(a, axis=-1, keepdims=True)

  layers = cfg.msa.router_layers
  enc = EncodedDocs(lengths=np.asarray(lengths, np.int64), keys={l: unit() for l in layers},
                    values={l: unit() for l in layers}, routing_keys={l: unit() for l in layers})
  bank = MemoryBank.from_encoded(BankSpec.for_model(cfg), enc)
  bank.live[list(dead)] = False
  return bank


def request(k: int) -> prefill.Request:
  """Two requests (left padded): routing question tokens (role 0) then answer tokens (role -1)."""
  queries, answers = [[5, 6, 7, 8, 9], [10, 11, 12]], [[13, 14], [15, 16, 17, 18]]
  t = max(len(q) + len(a) for q, a in zip(queries, answers))
  out = {n: np.zeros((2, t), np.int64) for n in REQUEST}
  for b, (q, a) in enumerate(zip(queries, answers)):
    n = len(q) + len(a)
    out["input_ids"][b, t - n:] = q + a
    out["doc_ids"][b, t - n:] = [0] * len(q) + [-1] * len(a)
    out["position_ids"][b, t - n:] = np.arange(k, k + n)
    out["attention_mask"][b, t - n:] = 1
  return prefill.Request.from_arrays(out)


def routing_queries(cfg: ModelConfig, seed: int, b: int = 3, t: int = 5):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, t, cfg.num_heads, cfg.head_dim)).astype(np.float32)
  mask = np.ones((b, t), bool)
  mask[1, :2] = False  # a row with padding
  mask[2] = False  # a row without routing tokens: selects nothing
  return jnp.asarray(q / np.linalg.norm(q, axis=-1, keepdims=True)), jnp.asarray(mask)


@functools.partial(jax.jit, static_argnums=(1,))
def _route_all(index, cfg, q, mask):
  l = cfg.msa.router_layers[0]  # one layer is enough here (stage 2 routes every layer)
  return {l: index.route(q, mask, l, cfg, with_doc_scores=True)}


def route_all(index, cfg, q, mask):
  """{layer: (rows, scores, doc_scores)} as numpy, through one jit."""
  return jax.tree.map(np.asarray, _route_all(index, cfg, q, mask))


def assert_same_routes(got, want):
  for l in want:
    for a, b, what in zip(got[l], want[l], ("rows", "scores", "doc_scores")):
      np.testing.assert_array_equal(a, b, err_msg=f"{what} L{l}")


def prefill_outputs(model, index, content, bank, *, with_state: bool = False):
  g, s = nnx.split(model)
  out, state = prefill.prefill_jit(g, s, index, content, jax.device_put(bank.doc_ids),
                                   prefill.TemplateKV.from_template(bank.template, model),
                                   request(model.cfg.msa.top_k_docs), max_new_tokens=2,
                                   with_doc_scores=True)
  return (out, state) if with_state else out


# --- placement ------------------------------------------------------------------------------------

def _brute_force_best(counts, parts):
  """The smallest achievable largest part over every contiguous split (small inputs)."""
  import itertools
  m = len(counts)
  cum = np.concatenate([[0], np.cumsum(counts)])
  best = None
  for cuts in itertools.combinations_with_replacement(range(m + 1), parts - 1):
    b = (0,) + cuts + (m,)
    worst = max(cum[b[i + 1]] - cum[b[i]] for i in range(parts))
    best = worst if best is None else min(best, worst)
  return best


def test_balanced_split_is_contiguous_whole_documents_and_optimal():
  rng = np.random.default_rng(0)
  for trial in range(60):
    m, parts = int(rng.integers(1, 9)), int(rng.integers(1, 5))
    counts = rng.integers(1, 11, m) * (rng.random(m) < 0.8) + 1  # very different lengths
    b = balanced_split(counts, parts)
    assert b[0] == 0 and b[-1] == m and np.all(np.diff(b) >= 0) and b.size == parts + 1
    worst = max(counts[b[i]:b[i + 1]].sum() for i in range(parts))
    assert worst == _brute_force_best(counts, parts), (counts, parts, b)


def test_plan_pads_shards_and_maps_every_row_and_chunk():
  counts = np.array([10, 1, 1, 1, 7, 2, 3])  # 25 chunks, 7 documents over 3 shards
  plan = plan_shards(counts, 3)
  assert plan.doc_start == (0, 1, 5, 7) and plan.chunk_start == (0, 10, 20, 25)
  assert plan.shard_chunks == 10 and plan.shard_docs == 4  # the largest shard: no padding
  chunk_doc = plan.local_chunk_doc(counts).reshape(3, 10)
  assert chunk_doc[0].tolist() == [1] * 10
  assert chunk_doc[1].tolist() == [1, 2, 3] + [4] * 7
  assert chunk_doc[2].tolist() == [1, 1, 2, 2, 2] + [0] * 5  # padded with invalid chunks
  off, cnt = plan.local_docs(counts)
  assert off.reshape(3, 4)[1].tolist() == [0, 1, 2, 3]
  assert cnt.reshape(3, 4)[0].tolist() == [10, 0, 0, 0]
  assert plan.row_slot().tolist() == [0, 4, 5, 6, 7, 8, 9]
  # Fewer documents than shards: the extra shards hold only padding.
  few = plan_shards(np.array([3, 5]), 4)
  assert few.doc_start[-1] == 2 and few.shard_chunks == 5 and few.shard_docs == 1
  # Per-process segments: documents never cross a process boundary.
  seg = plan_shards(counts, 4, segments=[(4, 2), (3, 2)])
  assert seg.doc_start[2] == 4 and seg.source_chunk_base == (0, 0, 13, 13)


# --- subprocesses: 4 simulated devices, and 2 processes under jax.distributed ---------------------
# They are started as soon as their inputs exist and run beside the in-process tests (the test
# process compiles on one core); the tests at the end of the file wait for their results.

class Workers:
  """Subprocesses running this file's workers (`python tests/test_parallel.py NAME ARGS...`)."""

  def __init__(self, args_per_process, devices: int):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "JAX_PLATFORMS": "cpu"}
    self.procs = [subprocess.Popen([sys.executable, __file__, *map(str, args)], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                  for args in args_per_process]

  def results(self, timeout: float = 300) -> list[dict]:
    outs = [p.communicate(timeout=timeout) for p in self.procs]
    for p, (_, err) in zip(self.procs, outs):
      assert p.returncode == 0, err[-3000:]
    return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]

  def stop(self) -> None:
    for p in self.procs:
      if p.poll() is None:
        p.kill()
        p.communicate()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


DOCS = dict(m=11, seed=5)  # the documents of the stage-2 tests (one of them deleted: DEAD)
DEAD = 4


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
  path = tmp_path_factory.mktemp("processes")
  workers = Workers([("process", i, _free_port() if i == 0 else None, path) for i in range(2)],
                    devices=2)
  yield workers, path
  workers.stop()


@pytest.fixture(scope="module")
def encoded(two_processes):
  """A small random model and its bank of 11 documents of 1 .. 40 tokens, one deleted."""
  model = small_model()
  tokens, lengths = random_docs(**DOCS)
  enc = encode.encode_documents(model, tokens, lengths)
  bank = MemoryBank.from_encoded(BankSpec.for_model(model.cfg), enc)
  bank.live[DEAD] = False
  return model, tokens, lengths, bank


@pytest.fixture(scope="module")
def disk_bank(encoded, tmp_path_factory):
  """The documents encoded data parallel on 2 devices and saved, one deleted; then a worker on 4
  devices starts reading it."""
  model, tokens, lengths, _ = encoded
  enc = parallel.encode_documents_sharded(model, tokens, lengths, parallel.make_memory_mesh(),
                                          batch_tokens=128)
  path = tmp_path_factory.mktemp("parallel") / "bank"
  with store.BankWriter(path, BankSpec.for_model(model.cfg)) as w:
    w.append(enc)
    w.delete([DEAD])
  bank = store.open_bank(path)
  want = prefill_outputs(model, RoutingIndex.from_bank(bank), DeviceContent.from_bank(bank), bank)
  np.savez(path.parent / "want.npz", logits=want.logits,
           **{f"{what}{l}": getattr(r, what) for l, r in want.routed.items()
              for what in ("rows", "scores")})
  workers = Workers([("four_devices", path, path.parent / "want.npz")], devices=4)
  yield enc, path, workers
  workers.stop()


# --- encoding and banks on disk -------------------------------------------------------------------

def test_sharded_encode_equals_single_device_encode(encoded, disk_bank):
  model, tokens, lengths, bank = encoded
  enc = disk_bank[0]
  np.testing.assert_array_equal(enc.lengths, lengths)
  for l in model.cfg.msa.router_layers:
    for kind in ("keys", "values", "routing_keys"):
      np.testing.assert_allclose(getattr(enc, kind)[l], getattr(bank, kind)[l], rtol=0, atol=1e-6,
                                 err_msg=f"{kind} L{l}")


def test_a_saved_bank_reopens_on_another_device_count(encoded, disk_bank):
  """Written from 2 devices, reopened on 1 and 2 here (4: test_four_devices_in_a_subprocess)."""
  cfg = encoded[0].cfg
  bank = store.open_bank(disk_bank[1])
  assert not bank.live[DEAD]
  q, mask = routing_queries(cfg, seed=7)
  want = route_all(RoutingIndex.from_bank(bank), cfg, q, mask)
  for n in (2, 1):
    index = parallel.ShardedRoutingIndex.from_bank(bank, parallel.make_memory_mesh(n))
    assert_same_routes(route_all(index, cfg, q, mask), want)


# --- routing on the 2 devices of this process -----------------------------------------------------

REDUCTIONS = [dict(),  # the paper's: head mean, query max, chunk max
              dict(head_reduce=HeadReduce.MAX, query_reduce=QueryReduce.MEAN,
                   chunk_reduce=ChunkReduce.MEAN),
              dict(query_reduce=QueryReduce.LAST)]


@pytest.mark.parametrize("m,reductions", [(13, 0), (9, 1)], ids=["13docs", "9docs-max-mean-mean"])
def test_sharded_route_is_bit_identical_to_one_device(m, reductions):
  """Documents of 1 .. 40 tokens, counts not divisible by the devices, deleted documents."""
  cfg = small_cfg(**REDUCTIONS[reductions])
  _, lengths = random_docs(m, seed=m)
  bank = synthetic_bank(cfg, lengths, seed=m, dead=[1])
  q, mask = routing_queries(cfg, seed=m)
  want = route_all(RoutingIndex.from_bank(bank), cfg, q, mask)
  assert (want[1][0][2] == -1).all()  # the row without routing tokens selects nothing
  index = parallel.ShardedRoutingIndex.from_bank(bank, parallel.make_memory_mesh(2))
  assert_same_routes(route_all(index, cfg, q, mask), want)
  # Deleting the winner afterwards (a new liveness vector) routes like a fresh single index.
  winner = int(want[1][0][0, 0])
  bank.live[winner] = False
  got = route_all(index.with_live(bank.live), cfg, q, mask)
  assert_same_routes(got, route_all(RoutingIndex.from_bank(bank), cfg, q, mask))
  assert winner not in got[1][0]


def test_ties_go_to_the_lower_bank_row_across_shards():
  cfg = small_cfg()
  bank = synthetic_bank(cfg, random_docs(13, seed=13)[1], seed=13, dead=[1])
  for l in cfg.msa.router_layers:  # every chunk has the same key: every document ties
    bank.routing_keys[l][:] = bank.routing_keys[l][:1]
  q, mask = routing_queries(cfg, seed=4)
  want = route_all(RoutingIndex.from_bank(bank), cfg, q, mask)
  got = route_all(parallel.ShardedRoutingIndex.from_bank(bank, parallel.make_memory_mesh(2)),
                  cfg, q, mask)
  assert_same_routes(got, want)
  assert got[1][0][:2].tolist() == [[0, 2, 3], [0, 2, 3]]  # the lowest live rows


# --- stage 2 end to end ---------------------------------------------------------------------------

def run_stage2(model, bank, path, mesh=None):
  runner = BankRunner(model, bank, content=path, mesh=mesh)
  sharded = isinstance(runner.index, parallel.ShardedRoutingIndex)
  assert sharded == (mesh is not None) and sharded == (
      isinstance(runner.content, parallel.ShardedDeviceContent) or path is not ContentPath.DEVICE)
  return runner.prefill(request(model.cfg.msa.top_k_docs), 2, with_doc_scores=True)[0]


@pytest.fixture(scope="module")
def single_device(encoded):
  model, _, _, bank = encoded
  return run_stage2(model, bank, ContentPath.DEVICE)


def assert_same_stage2(got, want):
  for l in want.routed:
    for what in ("rows", "doc_ids", "scores", "doc_scores"):
      np.testing.assert_array_equal(getattr(got.routed[l], what), getattr(want.routed[l], what),
                                    err_msg=f"{what} L{l}")
  np.testing.assert_array_equal(got.logits, want.logits)


@pytest.mark.parametrize("path", [ContentPath.DEVICE, ContentPath.CALLBACK, ContentPath.PAGED])
def test_bank_runner_on_a_mesh_equals_one_device(encoded, single_device, path):
  model, _, _, bank = encoded
  out = run_stage2(model, bank, path, mesh=parallel.make_memory_mesh())
  if path is ContentPath.PAGED:
    # The paged path jits layer by layer: its routing queries round differently from the single
    # jit's (on one device too), so only the selection is exact.
    for l, r in single_device.routed.items():
      np.testing.assert_array_equal(out.routed[l].rows, r.rows)
      np.testing.assert_allclose(out.routed[l].doc_scores, r.doc_scores, rtol=0, atol=1e-6)
    np.testing.assert_allclose(out.logits, single_device.logits, rtol=0, atol=1e-6)
  else:
    assert_same_stage2(out, single_device)
  assert DEAD not in np.asarray(out.routed[1].rows)


def test_sharded_host_content_reads_only_owned_winners(encoded, single_device):
  model, _, _, bank = encoded
  index = parallel.ShardedRoutingIndex.from_bank(bank, parallel.make_memory_mesh())
  content = parallel.ShardedHostContent(bank)
  out = prefill_outputs(model, index, content, bank)
  assert_same_stage2(out, single_device)
  chunk_bytes = 2 * model.cfg.num_kv_heads * model.cfg.head_dim * 4
  selected = sum(int(bank.chunk_count[r]) for rt in out.routed.values()
                 for r in np.asarray(rt.rows).ravel() if r >= 0)
  assert content.bytes_moved == selected * chunk_bytes  # each winner read once, by its owner


# --- results of the subprocesses ------------------------------------------------------------------

def test_four_devices_in_a_subprocess(disk_bank):
  """Synthetic banks of 13 and 3 (< 4) documents with deleted ones, and the bank written from 2
  devices reopened on 4: selections and stage-2 logits equal one device's, bit for bit."""
  (result,) = disk_bank[2].results()
  assert result == {"devices": 4, "synthetic_banks_equal": True, "stage2_equal": True}, result


def test_two_processes_each_encoding_and_owning_its_bank(encoded, two_processes):
  """jax.distributed with 2 processes x 2 devices: each process encodes its part of the documents
  into its own bank (data parallel on its devices), deletes one if it owns it, and serves it
  (host content read by each owner, then decoding); the result equals one device's on the
  concatenated banks."""
  model, tokens, lengths, single_bank = encoded
  workers, path = two_processes
  results = workers.results()
  bounds = parallel.partition_documents(lengths, 2, P)
  assert [r["documents"] for r in results] == [bounds[:2].tolist(), bounds[1:].tolist()]
  bank = parallel.open_process_banks([path / f"bank{i}" for i in range(2)])
  assert not bank.live[DEAD] and bank.live.sum() == DOCS["m"] - 1
  want, state = prefill_outputs(model, RoutingIndex.from_bank(bank), DeviceContent.from_bank(bank),
                               bank, with_state=True)
  with np.load(path / "out.npz") as got:
    np.testing.assert_array_equal(got["logits"], want.logits)
    for l, r in want.routed.items():
      np.testing.assert_array_equal(got[f"rows{l}"], r.rows)
      np.testing.assert_array_equal(got[f"ids{l}"], r.doc_ids)
    g, s = nnx.split(model)
    np.testing.assert_array_equal(got["tokens"], decode.generate(g, s, state, 2).tokens)
  # Encoded across processes, the bank matches the single-device encoding.
  for l in model.cfg.msa.router_layers:
    np.testing.assert_allclose(bank.keys[l], single_bank.keys[l], rtol=0, atol=1e-6)


# --- subprocess workers ---------------------------------------------------------------------------

def _same(got, want) -> bool:
  return all(np.array_equal(a, b) for l in want for a, b in zip(got[l], want[l]))


def _worker_four_devices(bank_path: str, want_path: str) -> dict:
  mesh = parallel.make_memory_mesh()
  ok = True
  for i, (m, red) in enumerate([(13, 0), (3, 1)]):  # 13 and 3 (< 4 devices) documents
    cfg = small_cfg(**REDUCTIONS[red])
    bank = synthetic_bank(cfg, random_docs(m, seed=i)[1], seed=i, dead=[1])
    q, mask = routing_queries(cfg, seed=i)
    index = parallel.ShardedRoutingIndex.from_bank(bank, mesh)
    want = route_all(RoutingIndex.from_bank(bank), cfg, q, mask)
    ok &= _same(route_all(index, cfg, q, mask), want)
  model = small_model()
  bank = store.open_bank(bank_path)  # written from 2 devices
  index = parallel.ShardedRoutingIndex.from_bank(bank, mesh)
  got = prefill_outputs(model, index, parallel.ShardedDeviceContent.from_bank(bank, index), bank)
  with np.load(want_path) as want:  # one device, in the test process
    stage2_ok = np.array_equal(got.logits, want["logits"]) and all(
        np.array_equal(getattr(r, what), want[f"{what}{l}"])
        for l, r in got.routed.items() for what in ("rows", "scores"))
  return {"devices": jax.device_count(), "synthetic_banks_equal": bool(ok),
          "stage2_equal": bool(stage2_ok)}


def _worker_process(process_id: str, port: str, workdir: str) -> dict:
  """One of 2 processes; process 0 also hosts the coordinator at `port` (read from a file by
  process 1, which passes "None")."""
  workdir = pathlib.Path(workdir)
  port_file = workdir / "port"
  if process_id == "0":
    port_file.write_text(port)
  else:
    import time
    while not port_file.exists() or not port_file.read_text():
      time.sleep(0.05)
    port = port_file.read_text()
  jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=int(process_id))
  model = small_model()
  tokens, lengths = random_docs(**DOCS)
  path = workdir / f"bank{jax.process_index()}"
  start, end = parallel.encode_to_process_bank(model, tokens, lengths, path, batch_tokens=128)
  if start <= DEAD < end:
    store.delete_documents(path, [DEAD])
  local = store.open_bank(path)
  mesh = parallel.make_memory_mesh()
  index = parallel.ShardedRoutingIndex.from_process_banks(local, mesh)
  g, s = nnx.split(parallel.replicate_model(model, mesh))
  tkv = parallel.replicate(prefill.TemplateKV.from_template(None, model), mesh)
  req = parallel.replicate(request(model.cfg.msa.top_k_docs), mesh)
  out, state = prefill.prefill_jit(g, s, index, parallel.ShardedHostContent(local), index.doc_ids,
                                   tkv, req, max_new_tokens=2)
  local_copy = lambda x: np.asarray(x.addressable_data(0))  # replicated: the whole result
  results = {"logits": local_copy(out.logits),
             "tokens": local_copy(decode.generate(g, s, state, 2).tokens)}
  for l, r in out.routed.items():
    results[f"rows{l}"] = local_copy(r.rows)
    results[f"ids{l}"] = local_copy(r.doc_ids)
  if jax.process_index() == 0:
    np.savez(workdir / "out.npz", **results)
  return {"documents": [start, end]}


if __name__ == "__main__":
  worker = {"four_devices": _worker_four_devices, "process": _worker_process}[sys.argv[1]]
  print(json.dumps(worker(*sys.argv[2:])))
