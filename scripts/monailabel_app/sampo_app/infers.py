"""The infer task of the SAMPO MONAI Label app and the proposals it records: ``SAMPOInferTask`` (MONAI Label's
``BundleInferTask``, explaining a model file that does not load), :func:`record_proposal` (what the model answered
to a datastore image's clicks, kept for its human preference pair) and :func:`freeze_pair` (a final label freezes
the latest proposal as the image's pair; bundle/pair_store.py)."""

from __future__ import annotations

import logging
import os
import time

from monailabel.tasks.infer.bundle import BundleInferTask

from sampo_app.http_checks import _first

logger = logging.getLogger(__name__)


class SAMPOInferTask(BundleInferTask):
    """``BundleInferTask`` whose model file, when torch cannot load it into the network, is explained by the
    bundle's loader (:class:`bundle.networks.CheckpointError` naming the file and what does not fit) instead of
    torch's ``Error(s) in loading state_dict``."""

    def check_model(self, path: str | None = None) -> None:
        """Raise ``CheckpointError`` / ``FileNotFoundError`` naming the cause if ``path`` (default: the served
        ``models/model.pt``) does not load into the network (the server checks this at start)."""
        import copy

        from bundle.checkpoints import load_weights

        load_weights(copy.deepcopy(self.network).cpu(), path or self.get_path())

    def _get_network(self, device, data):
        try:
            return super()._get_network(device, data)
        except RuntimeError as e:
            self.check_model()  # raises naming the cause where torch's message does not
            raise e

def record_proposal(pair_store, bundle: str, request, result, datastore) -> None:
    """Keep in ``pair_store`` what the model of ``bundle`` answered to a datastore image's clicks (2D images); never
    fails the request."""
    image = request.get("image")
    path = (result or {}).get("file")
    if pair_store is None or not isinstance(image, str) or os.path.exists(image) or not path:
        return  # an uploaded file, not a datastore image: nothing to pair a saved label with
    try:
        import numpy as np
        from PIL import Image

        from bundle.clicks import check_click_list
        from bundle.labeling import is_2d_image

        uri = datastore.get_image_uri(image)
        if not (is_2d_image(uri) and is_2d_image(path)):
            return
        with Image.open(path) as im:
            mask = np.asarray(im)
        with Image.open(uri) as im:
            size = (im.size[1], im.size[0])
        if mask.shape[:2] != size:
            logger.warning("SAMPO: answer for %s has size %s, its image %s: not kept as a proposal", image,
                           mask.shape, size)
            return
        model = os.path.join(bundle, "models", _first(request.get("model_filename")) or "model.pt")
        pair_store.record_proposal(
            image, uri, mask if mask.ndim == 2 else mask[..., 0],
            check_click_list(request.get("foreground"), "foreground"),
            check_click_list(request.get("background"), "background"),
            model=f"{model} (modified {time.ctime(os.path.getmtime(model))})" if os.path.isfile(model) else model)
    except Exception as e:  # the annotator got the answer; only its pairing is lost
        logger.warning("SAMPO: the answer for image %s was not kept as a proposal: %s", image, e)


def freeze_pair(pair_store, image: str, datastore) -> bool:
    """A final label of ``image`` was saved: freeze its latest proposal in ``pair_store`` as its pair; whether it
    has one."""
    if pair_store is None:
        return False
    try:
        return pair_store.freeze(image, datastore.get_image_uri(image)) is not None
    except Exception as e:  # the label is saved; it trains as a plain label
        logger.warning("SAMPO: label of %s saved, but its human pair was not stored: %s", image, e)
        return False
