"""Interactive prediction with an image-embedding cache: encode an image once, then answer every click by decoding.

:class:`SAMPOPredictor` has the shape of ``segment_anything.SamPredictor``: ``set_image`` then ``predict`` from
clicks. It returns exactly what the single-tensor forward returns for the same image and clicks,

    predict(points, labels) == net(cat([image, points_to_guidance(points, labels)]))    (best predicted-IoU logits)

because :meth:`~bundle.networks.PromptableSAM.forward` is ``decode_clicks(encode(image), clicks)`` and only the
``encode`` half is cached, in :class:`bundle.embedding_cache.EmbeddingCache` (the bundle's one embedding cache).
Cache contract:

* key ``(image_id, sha1 of the image tensor as the encoder receives it)``: the same id with other pixels is
  encoded again, and two ids never share an entry by accident;
* bounded: at most ``cache_size`` embeddings, least recently used evicted first (0: no cache);
* invalidated when the weights change: every lookup compares the network's weight fingerprint (object id plus,
  for every parameter and buffer, its storage address and in-place version counter: a ``load_state_dict``, an
  optimiser step or a reloaded network all change it) with the one the entries were computed with; and by hand
  with :meth:`SAMPOPredictor.invalidate`;
* thread-safe: the cache is guarded by a lock and the image a thread set is its own (``threading.local``), so
  concurrent requests on two images each get their own mask. Encoding runs outside the lock.

:class:`CachedPromptInferer` is the MONAI ``Inferer`` of ``configs/inference.yaml`` (so of MONAI Label's infer
task): it keeps one predictor for the served network object, shared by all its instances in the process (a config
parsed again keeps the cache), so a network that MONAI Label reloads after training starts a fresh cache. Networks
without ``encode`` / ``decode_clicks`` (TorchScript ``model.ts``) are run as they are. With ``tiling`` (mode
``propagate`` / ``routed``) a field of any size is run tile by tile at its own resolution (:mod:`bundle.tiling`);
each tile's embedding is cached under ``<image id>#<tile offset>``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from torch import nn

from bundle.tiling import Tiling, tiled_forward
from bundle.embedding_cache import EmbeddingCache, image_digest, weights_fingerprint  # noqa: F401  (re-exported)

logger = logging.getLogger(__name__)


def _weights(network: nn.Module) -> int:
    """The served network's fingerprint: every parameter and buffer counts."""
    return weights_fingerprint(network, [*network.parameters(), *network.buffers()])


class SAMPOPredictor:
    """Set an image once, predict masks from clicks; image embeddings cached (see the module docstring).

    Args:
        network: a :class:`~bundle.networks.PromptableSAM` (merged or with adapters), used in its current mode.
        cache_size: most image embeddings kept (least recently used evicted first; 0: encode every time).
    """

    def __init__(self, network: nn.Module, cache_size: int = 8) -> None:
        for method in ("encode", "decode_clicks", "decode_points"):
            if not callable(getattr(network, method, None)):
                raise TypeError(f"SAMPOPredictor needs a PromptableSAM (with {method}()), got {type(network).__name__}")
        self.network = network
        self.cache = EmbeddingCache(max_items=cache_size)
        self.cache.validate(_weights(network))
        self._current = threading.local()
        self.hits = self.misses = 0

    def invalidate(self) -> None:
        """Forget every cached embedding (the next request for each image encodes it again)."""
        with self.cache.lock:
            self.cache.clear()
            self.cache.fingerprint = _weights(self.network)

    def embedding(self, image: torch.Tensor, image_id: Optional[str] = None) -> torch.Tensor:
        """(C, H, W) image in [0, 1] -> its (1, D, h, w) embedding, from the cache or encoded now."""
        if image.ndim != 3 or image.shape[0] != self.network.in_channels:
            raise ValueError(
                f"expected an image ({self.network.in_channels}, H, W) in [0, 1], got shape {tuple(image.shape)}"
            )
        key = (image_id, image_digest(image))
        with self.cache.lock:
            fingerprint = _weights(self.network)
            dropped = self.cache.validate(fingerprint)
            if dropped is not None:
                logger.info("network weights changed: %d cached image embeddings dropped", dropped)
            cached = self.cache.get(key)
            self.hits, self.misses = self.hits + (cached is not None), self.misses + (cached is None)
        if cached is not None:
            return cached
        with torch.no_grad():
            emb = self.network.encode(image[None])
        logger.info("encoded image %s (%s…); later clicks on it decode only", image_id or "without id", key[1][:8])
        with self.cache.lock:
            if _weights(self.network) == fingerprint:  # not computed with weights replaced meanwhile
                self.cache.put(key, emb)
        return emb

    # -- SamPredictor's shape ------------------------------------------------------------------------------------------
    def set_image(self, image: Any, image_id: Optional[str] = None) -> None:
        """Make ``image`` this thread's current image and encode it unless cached.

        ``image``: a (C, H, W) float tensor in [0, 1] (what the bundle's preprocessing gives), or an (H, W, C) uint8
        array as ``SamPredictor.set_image`` takes. The encoder resizes to ``image_size``; clicks are in (H, W).
        """
        if isinstance(image, np.ndarray) and image.dtype == np.uint8:
            image = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))).float() / 255.0
        image = torch.as_tensor(image, dtype=torch.float32)
        p = next(self.network.parameters())
        image = image.to(p.device)
        self._current.embedding = self.embedding(image, image_id)
        self._current.size = tuple(image.shape[-2:])

    def predict(self, points: Sequence[Sequence[float]], labels: Sequence[int]) -> torch.Tensor:
        """(P, 2) (x, y) pixel clicks on the current image with labels 1 / 0 -> (1, H, W) logits of the best
        predicted-IoU mask (``> 0``: the mask): ``SamPredictor.predict``'s best mask, and ``net(x)``'s for the same
        image and click channels (clicks on pixel centres; click channels hold whole pixels)."""
        emb = getattr(self._current, "embedding", None)
        if emb is None:
            raise RuntimeError("no image set in this thread: call set_image(image) before predict(points, labels)")
        pts = torch.as_tensor(np.asarray(points, np.float32).reshape(-1, 2), device=emb.device)
        labs = torch.as_tensor(np.asarray(labels, np.int64).reshape(-1), device=emb.device)
        if len(pts) != len(labs):
            raise ValueError(f"{len(pts)} points but {len(labs)} labels")
        with torch.no_grad():
            return self.network.decode_points(emb, pts[None], labs[None], self._current.size)[0]

    def forward_input(self, x: torch.Tensor, image_ids: Optional[Sequence[Optional[str]]] = None) -> torch.Tensor:
        """``net(x)`` for the single-tensor input (B, C + 2, H, W), each image's embedding from the cache."""
        c = self.network.in_channels
        if x.ndim != 4 or x.shape[1] != c + 2:
            return self.network(x)  # the network's own shape error
        ids = list(image_ids) if image_ids is not None else [None] * x.shape[0]
        emb = torch.cat([self.embedding(x[b, :c], ids[b]) for b in range(x.shape[0])])
        with torch.no_grad():
            return self.network.decode_clicks(emb, x[:, c:])


def _image_ids(inputs: Any, batch: int) -> list:
    """The image file names a MetaTensor batch carries (``filename_or_obj``), else ``None`` per image."""
    name = inputs.meta.get("filename_or_obj") if isinstance(inputs, MetaTensor) else None
    names = list(name) if isinstance(name, (list, tuple)) else [name] * batch
    return [str(n) if n else None for n in names][:batch] + [None] * max(0, batch - len(names))


class CachedPromptInferer(Inferer):
    """Run the single-tensor input through a :class:`SAMPOPredictor` of the network (a plain ``network(x)`` for
    networks that cannot be split, e.g. TorchScript).

    Args:
        cache_size: image embeddings kept per served network (0: no cache); with tiling, a field holds one
            embedding per tile.
        tiling: a :class:`~bundle.tiling.Tiling` or its config mapping; ``None`` or mode ``resize``: the input is
            run as it is (what :class:`~bundle.inference.PromptImaged` resized).
    """

    _served: Optional[SAMPOPredictor] = None  # shared by the instances: a config parsed again keeps the cache
    _lock = threading.Lock()

    def __init__(self, cache_size: int = 8, tiling: Tiling | dict | None = None) -> None:
        EmbeddingCache(max_items=cache_size)  # the argument check, before the first request
        self.cache_size = cache_size
        self.tiling = None if tiling is None or Tiling.of(tiling).mode == "resize" else Tiling.of(tiling)

    def predictor(self, network: nn.Module) -> SAMPOPredictor:
        """The predictor of ``network`` (a new one, with an empty cache, when the served network object changed)."""
        cls = type(self)
        with cls._lock:
            served = cls._served
            if served is None or served.network is not network or served.cache.max_items != self.cache_size:
                served = cls._served = SAMPOPredictor(network, self.cache_size)
            return served

    def __call__(self, inputs: torch.Tensor, network, *args, **kwargs):
        x = inputs.as_tensor() if isinstance(inputs, MetaTensor) else inputs
        splittable = callable(getattr(network, "decode_clicks", None))
        if args or kwargs:
            return network(x, *args, **kwargs)
        ids = _image_ids(inputs, x.shape[0])
        if self.tiling is None:
            return self.predictor(network).forward_input(x, ids) if splittable else network(x)
        channels = int(getattr(network, "in_channels", x.shape[1] - 2))
        out = []
        for b in range(x.shape[0]):
            def forward(tiles: torch.Tensor, tile_ids, image_id=ids[b]) -> torch.Tensor:
                if not splittable:
                    return network(tiles)
                return self.predictor(network).forward_input(tiles, [f"{image_id}#{t}" if image_id else None
                                                                     for t in tile_ids])
            out.append(tiled_forward(forward, x[b], self.tiling, channels).to(x.device))
        return torch.stack(out)
