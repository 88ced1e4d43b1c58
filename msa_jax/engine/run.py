"""Stages 2 and 3 end to end over a bank: route and prefill, then decode.

The content path decides how the selected documents' K̄/V̄ reach the device:
- DEVICE: the whole content is put on device once (small banks, tests);
- CALLBACK: one jit; content stays on host / disk and a `pure_callback` reads the selected chunks;
- PAGED: host-driven; the selection comes back to the host and a device LRU page cache moves only
  missing documents (explicit transfers; repeated documents move once).
"""

from __future__ import annotations

import enum

import jax
import jax.numpy as jnp
from flax import nnx, struct

from msa_jax.engine import decode, prefill
from msa_jax.engine.sampling import Sampling
from msa_jax.memory.bank import MemoryBank
from msa_jax.memory.index import DeviceContent, HostContent, RoutingIndex
from msa_jax.memory.paging import PageCache
from msa_jax.memory.store import BankError
from msa_jax.nn.model import MSAForCausalLM


class ContentPath(enum.Enum):
  DEVICE = "device"
  CALLBACK = "callback"
  PAGED = "paged"

  @classmethod
  def default(cls) -> "ContentPath":
    """PAGED on accelerators (explicit, cached transfers); CALLBACK on CPU, where host and
    device memory are the same RAM and one jit avoids per-layer dispatch."""
    return cls.CALLBACK if jax.default_backend() == "cpu" else cls.PAGED


@struct.dataclass
class Generation:
  prefill: prefill.PrefillOutput  # stage-2 logits [B, T, V] and per-layer routing
  tokens: jax.Array  # [B, N]
  logits: jax.Array  # [N, B, V]


class BankRunner:
  """A model bound to a bank: builds the routing index and the content source once."""

  def __init__(self, model: MSAForCausalLM, bank: MemoryBank, *,
               content: ContentPath | None = None, page_slots: int = 256, mesh=None):
    """mesh: a `msa_jax.parallel.make_memory_mesh()` mesh to shard the routing index (and DEVICE
    content) over its devices, with the weights replicated (Memory Parallel); None: one device.

    Raises `BankError` when the bank has no live document: such a bank is a valid stored state
    (documents may be added later) but there is nothing to route to."""
    if not bank.live.any():
      state = ("it is empty" if bank.num_docs == 0
               else f"all {bank.num_docs} stored documents are deleted")
      raise BankError(f"the bank has no live documents ({state}): add documents before routing "
                      "or generating")
    if mesh is not None:
      from msa_jax import parallel
      model = parallel.replicate_model(model, mesh)
    self.model, self.bank = model, bank
    self.graphdef, self.state = nnx.split(model)
    self.path = content or ContentPath.default()
    self.index = (RoutingIndex.from_bank(bank) if mesh is None
                  else parallel.ShardedRoutingIndex.from_bank(bank, mesh))
    self.doc_ids = jax.device_put(bank.doc_ids)
    self.template = prefill.TemplateKV.from_template(bank.template, model)
    if self.path is ContentPath.DEVICE:
      self.content = (DeviceContent.from_bank(bank) if mesh is None
                      else parallel.ShardedDeviceContent.from_bank(bank, self.index))
    elif self.path is ContentPath.CALLBACK:
      self.content = HostContent(bank)
    else:
      self.content = PageCache(bank, page_slots)

  @property
  def bytes_moved(self) -> int:
    """Content bytes moved to the device so far (0 for DEVICE: it was all moved up front)."""
    return getattr(self.content, "bytes_moved", 0)

  def prefill(self, request: prefill.Request, max_new_tokens: int, *,
              with_doc_scores: bool = False):
    """Stage 2; `with_doc_scores` also returns every bank row's score (for inspection). Raises
    `RequestError` for token ids outside the model's vocabulary or negative positions."""
    request.check(self.model.cfg.vocab_size)
    if self.path is ContentPath.PAGED:
      return prefill.route_and_prefill_paged(self.model, self.index, self.content, self.doc_ids,
                                             self.template, request, max_new_tokens,
                                             with_doc_scores=with_doc_scores)
    return prefill.prefill_jit(self.graphdef, self.state, self.index, self.content, self.doc_ids,
                               self.template, request, max_new_tokens=max_new_tokens,
                               with_doc_scores=with_doc_scores)

  def generate(self, request: prefill.Request, max_new_tokens: int, *,
               sampling: Sampling = Sampling(), stop_tokens: tuple[int, ...] = (),
               key: jax.Array | None = None) -> Generation:
    out, state = self.prefill(request, max_new_tokens)
    gen = decode.generate(self.graphdef, self.state, state, max_new_tokens, sampling=sampling,
                          stop_tokens=stop_tokens, key=key)
    return Generation(prefill=out, tokens=gen.tokens, logits=gen.logits)
