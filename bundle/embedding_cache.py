"""The bundle's one image-embedding cache: its key, its fingerprint of the weights, its memory bound.

A SAM image embedding depends only on the pixels the encoder receives and on the encoder's weights. Two parts keep
them: training keeps pi_ref's (:mod:`bundle.reference_cache`), and interactive serving keeps the served network's
(:mod:`bundle.predictor`). Both use this cache:

* key: ``image_digest(x) = sha1(shape | dtype | bytes of x)`` of the tensor as the encoder receives it, after every
  preprocessing step. A user may add to it: an image id, the autocast dtype. Keys hold content, so another crop,
  resize, augmentation or tile never hits another image's entry;
* validity: ``weights_fingerprint(owner, tensors) = hash(id(owner), ((t.data_ptr(), t._version) for t in tensors))``
  changes when the network object, a tensor's storage or an in-place write changes (an optimiser step,
  ``load_state_dict``, paper 003's fold). :meth:`EmbeddingCache.validate` drops every entry when the fingerprint
  differs from the one the entries were computed with. Each user says which tensors count: every weight for
  serving, the non-adapter encoder tensors for pi_ref;
* bound: at most ``max_items`` entries and ``max_bytes`` bytes, each optional. The least recently used entry goes
  out first. An entry larger than ``max_bytes`` is not kept;
* thread-safe: a re-entrant lock (:attr:`EmbeddingCache.lock`) guards every access. Concurrent MONAI Label requests
  share one cache.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from typing import Any, Hashable, Iterable

import torch


def image_digest(image: torch.Tensor) -> str:
    """sha1 of a tensor's shape, dtype and values: the content key of an embedding."""
    t = image.detach().to("cpu").contiguous()
    h = hashlib.sha1(f"{tuple(t.shape)}{t.dtype}".encode())
    h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def weights_fingerprint(owner: Any, tensors: Iterable[torch.Tensor]) -> int:
    """Changes when ``owner`` is another object or one of ``tensors`` has another storage or was written in place."""
    return hash((id(owner), tuple((t.data_ptr(), 0 if t.is_inference() else t._version) for t in tensors)))


def _nbytes(value: Any) -> int:
    return value.numel() * value.element_size() if isinstance(value, torch.Tensor) else 0


class EmbeddingCache:
    """A thread-safe LRU of embeddings, valid for one fingerprint of the weights (module docstring).

    Args:
        max_items: most entries kept (0: none; None: no count bound).
        max_bytes: most bytes of tensors kept (None: no size bound).
    """

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None) -> None:
        if max_items is not None and (isinstance(max_items, bool) or not isinstance(max_items, int) or max_items < 0):
            raise ValueError(f"cache_size must be an integer >= 0, got {max_items!r}")
        if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0):
            raise ValueError(f"the cache's byte bound must be an integer >= 0, got {max_bytes!r}")
        self.max_items, self.max_bytes = max_items, max_bytes
        self._items: OrderedDict[Hashable, Any] = OrderedDict()
        self._bytes = 0
        self.fingerprint: int | None = None
        self.lock = threading.RLock()

    def validate(self, fingerprint: int) -> int | None:
        """Keep the entries if they were computed under ``fingerprint``; else drop them all. Returns None when the
        fingerprint is unchanged, else how many entries were dropped (0 on the first call)."""
        with self.lock:
            if fingerprint == self.fingerprint:
                return None
            dropped = len(self._items)
            self.clear()
            self.fingerprint = fingerprint
            return dropped

    def get(self, key: Hashable) -> Any:
        with self.lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        size = _nbytes(value)
        with self.lock:
            if self.max_items == 0 or (self.max_bytes is not None and size > self.max_bytes):
                return
            if key in self._items:
                self._bytes -= _nbytes(self._items.pop(key))
            self._items[key] = value
            self._bytes += size
            while (self.max_items is not None and len(self._items) > self.max_items) or (
                    self.max_bytes is not None and self._bytes > self.max_bytes):
                _, old = self._items.popitem(last=False)
                self._bytes -= _nbytes(old)

    def clear(self) -> None:
        with self.lock:
            self._items.clear()
            self._bytes = 0

    def keys(self) -> list:
        with self.lock:
            return list(self._items)

    @property
    def nbytes(self) -> int:
        """Bytes of the tensors held."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
