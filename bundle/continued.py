"""Continued training: a training run starts from the model being served and, when it succeeds, is served next.

MONAI Label's train task (scripts/monailabel_app) uses this so that each annotation round improves the model the
annotators work with instead of starting again from SAM's initial weights:

1. :func:`served_as_base`: the served ``models/model.pt`` (merged weights, ``lora_rank`` 0) is written in SAM's
   official key layout into the run folder and becomes the run's ``sam_checkpoint``. The training network is the
   usual one: that base plus fresh LoRA adapters (initialised to zero effect) and trainable copies of the prompt
   encoder / mask decoder. So training begins exactly at the served model, and SAMPO's reference policy (adapters
   off, decoder copies at their initial values) *is* the served model: the DPO terms keep the new model close to
   what annotators used, not to SAM.
2. :func:`publish`: after the run, its merged export (``<run>/models/model.pt``, and ``model.ts`` when the bundle
   serves one) replaces the bundle's, each by an atomic rename; the files served before are kept in the run folder
   (``served_before/``) to roll back by copying them back. MONAI Label's infer task reloads ``model.pt`` when its
   modification time changes, as a new network object, so the next request is answered by the new model (and the
   embedding cache of :mod:`bundle.predictor`, one per network object and checked against the weights, starts
   empty) without a server restart.
"""

from __future__ import annotations

import logging
import os
import shutil

from bundle.io import atomic_write

logger = logging.getLogger(__name__)

SERVED_FILES = ("model.pt", "model.ts")  # what a bundle serves (MONAI Label: model.pt; MONAI Deploy: model.ts)


def served_as_base(model_pt: str | os.PathLike, dest: str | os.PathLike, model_size: str, image_size: int) -> str:
    """The served merged ``model_pt`` -> a SAM checkpoint ``dest`` in the official layout (the run's base).

    Raises :class:`~bundle.networks.CheckpointError` naming the file when it does not load into a ``model_size`` /
    ``image_size`` network (e.g. the train config trains another SAM size than the one served).
    """
    from bundle.checkpoints import load_network
    from bundle.networks.sam_builder import save_sam_checkpoint

    net = load_network(model_pt, model_size=model_size, image_size=image_size, lora_rank=0)
    save_sam_checkpoint(net._sam, dest)
    logger.info("training starts from the served model %s (written as the run's base %s)", model_pt, dest)
    return os.fspath(dest)


def _copy(src: str, dest: str) -> None:
    with open(src, "rb") as f, atomic_write(dest, "wb") as out:
        shutil.copyfileobj(f, out)


def publish(run_models: str | os.PathLike, served_models: str | os.PathLike, backup: str | os.PathLike) -> list[str]:
    """Serve the run's export: copy ``run_models``/model.pt (and model.ts where the bundle has one) over
    ``served_models``' files atomically, the previous ones first to ``backup``. Returns the replaced paths.

    Raises ``FileNotFoundError`` (nothing replaced) when the run left no ``model.pt``.
    """
    run_models, served_models, backup = map(os.fspath, (run_models, served_models, backup))
    names = [n for n in SERVED_FILES if os.path.isfile(os.path.join(run_models, n))
             and (n == "model.pt" or os.path.isfile(os.path.join(served_models, n)))]
    if "model.pt" not in names:
        raise FileNotFoundError(f"{run_models}: the training run exported no model.pt; the served model is unchanged")
    for name in names:
        if os.path.isfile(os.path.join(served_models, name)):
            _copy(os.path.join(served_models, name), os.path.join(backup, name))
    replaced = []
    for name in sorted(names, key=lambda n: n == "model.pt"):  # model.pt last: its new mtime makes MONAI Label reload
        _copy(os.path.join(run_models, name), os.path.join(served_models, name))
        replaced.append(os.path.join(served_models, name))
    logger.info("now serving the training run's export %s (previous files kept in %s)", run_models, backup)
    return replaced
