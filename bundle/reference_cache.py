"""The reference policy's image embeddings, computed once per image and reused every epoch.

pi_ref is the network with its adapters off (:meth:`bundle.networks.PromptableSAM.reference`): its image encoder is
the frozen base, which no optimiser step changes. So for an image that reaches the trainer with the same pixels
(no random augmentation) its reference embedding ``net.encode(image)`` under ``net.reference()`` is the same in
every epoch; :class:`ReferenceEmbeddingCache` computes it on first use and serves it afterwards, so from the
second epoch on an iteration runs one image encoder forward (the actor's) instead of two.

Cache contract:

* key: the sha1 of the image tensor as the encoder receives it (shape, dtype and values, after every
  preprocessing transform), plus the autocast dtype it was computed under. Content keyed: a different crop,
  resize, stain augmentation or tile never hits another image's entry, and no item id is needed (so it also
  holds for every rank of a distributed run, each caching the items of its own shard);
* invalidated when the reference encoder's weights may have changed: every lookup compares their fingerprint
  (the network object, and for every image-encoder parameter and buffer that is not a LoRA adapter its storage
  address and in-place version counter) with the one the entries were computed with. An optimiser step changes
  only the adapters and so keeps the entries; paper 003's stage boundary (:func:`bundle.networks.lora.
  fold_adapters`, the stage-1 model folded into the base) and a ``load_state_dict`` drop them;
* stored in float16 on the CPU, and always returned from that copy (also on the first, computing use), so a run
  is the same whether an entry was just computed or found. The float16 rounding (relative error <= 2^-11 ~ 5e-4
  per value; the embeddings end in a LayerNorm, values of order 1) is the only difference to training without
  the cache;
* bounded: at most ``max_mib`` MiB in memory, least recently used first out. One entry is D x h x w x 2 bytes,
  h = w = image_size / 16: 256 x 14 x 14 x 2 = 98 KiB for ViT-B at 224 px (4096 MiB: about 42,000 images),
  128 x 16 x 16 x 2 = 64 KiB for the testbed's small SAM at 256 px, 2 MiB for ViT-B at SAM's 1024 px (about 2,000
  images). The first entry's size and how many fit are logged;
* optionally on disk (``cache_dir``): one ``.npy`` per entry under a folder named by a sha1 of the reference
  encoder's weights, the model size and the image size (computed when the weights fingerprint changes: one pass
  over the encoder weights), so another base, a folded stage 2 or another image size never reads these files.
  Disk entries are not bounded; delete the folder to reclaim the space. Several ranks may share it (atomic
  writes);
* bypassed when the training pipeline has random augmentation (``augment``, the config's ``train#augment``): a
  content key would never hit, so no image is hashed, the reference encodes every batch, and one log line says so.

Call :meth:`ReferenceEmbeddingCache.encode` inside ``net.reference()`` (as
:func:`bundle.engines.decode_actor_and_reference` does). The key, the fingerprint and the in-memory LRU are the
bundle's one embedding cache (:mod:`bundle.embedding_cache`, also behind the interactive predictor); this module adds
pi_ref's choice of tensors, the float16 copies, the disk folder and the bypass.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Sequence

import numpy as np
import torch
from torch import nn

from bundle.embedding_cache import EmbeddingCache, image_digest, weights_fingerprint
from bundle.io import save_npy

logger = logging.getLogger(__name__)


def image_digests(images: torch.Tensor) -> list[str]:
    """The content key of each (C, H, W) image of a (B, C, H, W) batch (:func:`bundle.embedding_cache.image_digest`)."""
    return [image_digest(item) for item in images.detach().to("cpu")]


def _reference_tensors(network: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The image encoder's tensors pi_ref computes with: every parameter and buffer that is not a LoRA adapter."""
    encoder = network._sam.image_encoder
    named = [*encoder.named_parameters(), *encoder.named_buffers(),
             *[(n, b) for n, b in network.named_buffers(recurse=False)]]
    return [(n, t) for n, t in named if "lora_" not in n]


def reference_fingerprint(network: nn.Module) -> int:
    """Changes whenever the reference encoder's weights may have changed (another object, storage, in-place write)."""
    return weights_fingerprint(network, [t for _, t in _reference_tensors(network)])


def reference_digest(network: nn.Module) -> str:
    """sha1 of the reference encoder's weights (names, shapes, values), model size and image size: the disk folder."""
    h = hashlib.sha1(f"{getattr(network, 'model_size', '')}|{getattr(network, 'image_size', '')}".encode())
    for name, t in _reference_tensors(network):
        t = t.detach().to("cpu")
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).contiguous().numpy().tobytes())
    return h.hexdigest()


def _autocast_tag(device: torch.device) -> str:
    kind = device.type
    if torch.is_autocast_enabled(kind):
        return str(torch.get_autocast_dtype(kind)).replace("torch.", "")
    return "float32"


class ReferenceEmbeddingCache:
    """pi_ref's image embeddings, keyed by image content (see the module docstring for the contract).

    Args:
        cache_dir: also keep the entries in this folder, across runs (None: memory only).
        max_mib: most MiB of float16 embeddings kept in memory (least recently used evicted first), > 0.
        augment: the training pipeline's augmentation transforms (``train#augment``); any present means random
            augmentation: the cache is bypassed (every reference embedding is computed), announced once in the log.

    ``hits`` / ``misses`` count the images served from the cache / encoded; ``encoded_batches`` the calls of the
    reference encoder.
    """

    def __init__(self, cache_dir: str | None = None, max_mib: float = 4096.0, augment: Sequence = ()) -> None:
        if isinstance(max_mib, bool) or not isinstance(max_mib, (int, float)) or not max_mib > 0:
            raise ValueError(f"reference cache max_mib must be a number > 0 (MiB of float16 embeddings kept in "
                             f"memory), got {max_mib!r}")
        if cache_dir is not None and not isinstance(cache_dir, (str, os.PathLike)):
            raise ValueError(f"reference_cache_dir must be a folder path or null (memory only), got {cache_dir!r}")
        self.cache_dir = os.fspath(cache_dir) if cache_dir is not None else None
        self.max_bytes = int(max_mib * 2**20)
        self.bypassed = len(augment or ()) > 0
        self._memory = EmbeddingCache(max_bytes=self.max_bytes)
        self._folder: str | None = None
        self._announced = self._sized = False
        self.hits = self.misses = self.encoded_batches = 0

    def __len__(self) -> int:
        return len(self._memory)

    @property
    def nbytes(self) -> int:
        """Bytes of the embeddings held in memory."""
        return self._memory.nbytes

    def clear(self) -> None:
        """Forget every entry held in memory (the disk folder is kept)."""
        self._memory.clear()

    def encode(self, network: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """``network.encode(images)`` of pi_ref (call inside ``network.reference()``), from the cache where it can:
        (B, C, H, W) -> (B, D, h, w) on the images' device, float32 (the autocast dtype under autocast)."""
        if self.bypassed:
            if not self._announced:
                logger.info("reference_cache bypassed: train#augment holds random augmentation, so an image never "
                            "reaches the reference twice with the same pixels; the reference encodes every batch")
                self._announced = True
            self.encoded_batches += 1
            self.misses += images.shape[0]
            return network.encode(images)
        self._check_weights(network)
        tag = _autocast_tag(images.device)
        keys = [(tag, d) for d in image_digests(images)]
        found = [self._get(k) for k in keys]
        missing = [i for i, e in enumerate(found) if e is None]
        if missing:
            index = torch.tensor(missing, device=images.device)
            fresh = network.encode(images if len(missing) == len(keys) else images.index_select(0, index))
            self.encoded_batches += 1
            for i, emb in zip(missing, fresh.detach()):
                found[i] = emb.to("cpu", torch.float16, copy=True)
                self._put(keys[i], found[i])
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        dtype = torch.float32 if tag == "float32" else getattr(torch, tag)
        with torch.autocast(images.device.type, enabled=False):  # CPU autocast refuses float16 in stack
            return torch.stack(found).to(images.device, dtype)

    # -- entries -----------------------------------------------------------------------------------------------------
    def _check_weights(self, network: nn.Module) -> None:
        first = self._memory.fingerprint is None
        dropped = self._memory.validate(reference_fingerprint(network))
        if dropped is None:
            return
        if first:
            logger.info("reference embedding cache: each image's reference embedding is computed once and kept in "
                        "float16 (at most %.0f MiB in memory%s)", self.max_bytes / 2**20,
                        f", and in {self.cache_dir}" if self.cache_dir else "")
        elif dropped:
            logger.info("reference encoder weights changed: %d cached reference embeddings dropped", dropped)
        if self.cache_dir is not None:
            self._folder = os.path.join(self.cache_dir, reference_digest(network)[:16])
            os.makedirs(self._folder, exist_ok=True)

    def _path(self, key: tuple[str, str]) -> str:
        return os.path.join(self._folder, f"{key[1]}_{key[0]}.npy")

    def _get(self, key: tuple[str, str]) -> torch.Tensor | None:
        emb = self._memory.get(key)
        if emb is not None:
            return emb
        if self._folder is None or not os.path.isfile(self._path(key)):
            return None
        try:
            emb = torch.from_numpy(np.load(self._path(key), allow_pickle=False))
        except (OSError, ValueError) as exc:  # a truncated or foreign file: computed again and rewritten
            logger.warning("unreadable reference cache file %s (%s): computing that embedding again",
                           self._path(key), exc)
            return None
        self._put(key, emb, write=False)
        return emb

    def _put(self, key: tuple[str, str], emb: torch.Tensor, write: bool = True) -> None:
        if self._folder is not None and write:
            save_npy(emb.numpy(), self._path(key))
        size = emb.numel() * emb.element_size()
        if not self._sized:
            logger.info("reference embedding cache: %.0f KiB per image (%s float16): %d images fit in max_mib %.0f",
                        size / 2**10, " x ".join(map(str, emb.shape)), self.max_bytes // size, self.max_bytes / 2**20)
            self._sized = True
        self._memory.put(key, emb)
