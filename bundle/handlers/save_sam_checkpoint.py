"""At the end of a run, write the network's SAM weights in the official key layout (``configs/pretrain.yaml``)."""

from __future__ import annotations

import logging
import os

from ignite.engine import Engine, Events

logger = logging.getLogger(__name__)


class SaveSAMCheckpoint:
    """At the end of a run, write the network's SAM weights in the official key layout (what ``--sam_checkpoint``
    loads with :func:`bundle.networks.load_sam_checkpoint`), atomically, and log the file's md5.

    Args:
        network: the trained :class:`bundle.networks.PromptableSAM` (``lora_rank`` 0: its weights are SAM's own).
        path: the file to write, e.g. ``models/sam_small_base.pth``.
        dtype: ``float16`` halves the file (the loader casts back), ``float32`` keeps it exact.
        mlflow_handler: the trainer's ``MLFlowHandler``; its run gets the md5 and path as tags.
        tracking_uri: the MLflow tracking URI it logs to.
    """

    def __init__(self, network, path: str, dtype: str = "float16", mlflow_handler=None, tracking_uri: str = "") -> None:
        import torch

        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        self.network, self.path, self.dtype = network, path, getattr(torch, dtype)
        self.mlflow_handler, self.tracking_uri = mlflow_handler, tracking_uri
        self.run = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self._started)
        engine.add_event_handler(Events.COMPLETED, self)

    def _started(self, engine: Engine) -> None:
        self.run = getattr(self.mlflow_handler, "cur_run", None)  # the MLflow handler closes it on completion

    def __call__(self, engine: Engine) -> None:
        from bundle.networks import save_sam_checkpoint

        if getattr(self.network, "lora_rank", 0):
            raise ValueError(f"SaveSAMCheckpoint: the network has LoRA adapters (lora_rank {self.network.lora_rank}); "
                             "merge them first (bundle.export.merge_lora) or train with lora_rank 0")
        md5 = save_sam_checkpoint(self.network._sam, self.path, self.dtype)
        size_mb = os.path.getsize(self.path) / 2**20
        logger.info("SAM weights (official key layout, %s) written to %s: %.1f MiB, md5 %s", self.dtype,
                    os.path.abspath(self.path), size_mb, md5)
        if self.run is not None and self.tracking_uri:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.tracking_uri)
            client.set_tag(self.run.info.run_id, "sam_checkpoint", os.path.abspath(self.path))
            client.set_tag(self.run.info.run_id, "sam_checkpoint_md5", md5)
