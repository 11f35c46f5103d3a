"""Small Ignite handlers of the bundle (MONAI's handlers do the rest)."""

from __future__ import annotations

import logging
import os

from ignite.engine import Engine, Events

from bundle.engines import latest_checkpoint

logger = logging.getLogger(__name__)


class RunSummary:
    """At the end of training, print where the checkpoints and the MLflow run are, and how to open them.

    Args:
        ckpt_dir: folder of the CheckpointSaver files.
        mlflow_handler: the trainer's ``monai.handlers.MLFlowHandler``.
        tracking_uri: the MLflow tracking URI it logs to.
        initialisation: how the network was initialised (``random`` or the checkpoint's file name).
    """

    def __init__(self, ckpt_dir: str, mlflow_handler=None, tracking_uri: str = "", initialisation: str = "") -> None:
        self.ckpt_dir, self.mlflow_handler, self.initialisation = ckpt_dir, mlflow_handler, initialisation
        self.tracking_uri = tracking_uri
        self.run = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        self.run = getattr(self.mlflow_handler, "cur_run", None)  # the MLflow handler closes it on completion
        if self.initialisation == "random":
            print("NOTE: training SAM from RANDOM INITIALISATION (no official checkpoint in models/; see README).")

    def completed(self, engine: Engine) -> None:
        lines = ["", "Training finished."]
        best = sorted(f for f in os.listdir(self.ckpt_dir) if f.startswith("best_model")) if os.path.isdir(self.ckpt_dir) else []
        if best:
            lines.append(f"  best checkpoint (validation Dice): {os.path.abspath(os.path.join(self.ckpt_dir, best[-1]))}")
        latest = latest_checkpoint(self.ckpt_dir)
        if latest:
            lines.append(f"  latest state (for resuming):      {os.path.abspath(latest)}")
        run = self.run
        if run is not None:
            uri = self.tracking_uri
            lines += [
                f"  MLflow run: {run.info.run_name} (id {run.info.run_id}) in experiment "
                f"'{self.mlflow_handler.experiment_name}'",
                f"  MLflow store: {uri}",
                f"  open it with: mlflow ui --backend-store-uri {uri}",
            ]
        if self.initialisation == "random":
            lines.append("  (the network was trained from random initialisation)")
        print("\n".join(lines), flush=True)


class TrainingState:
    """Save the full training state every ``save_interval`` epochs and resume from ``resume_from`` at start.

    MONAI's ``CheckpointSaver`` / ``CheckpointLoader`` do the work; this handler hands them the trainer itself
    (known only at ``attach``), so the config needs no reference from the handlers back to the trainer.

    Args:
        ckpt_dir: folder of the ``checkpoint_epoch=N.pt`` files (the newest one is kept).
        objects: what to save besides the trainer, e.g. ``{"network": ..., "optimizer": ..., "lr_scheduler": ...}``.
        resume_from: a saved state to load before training starts, or None to start afresh.
        save_interval: epochs between saves.
    """

    def __init__(self, ckpt_dir: str, objects: dict, resume_from: str | None = None, save_interval: int = 1) -> None:
        self.ckpt_dir, self.objects, self.resume_from, self.save_interval = ckpt_dir, objects, resume_from, save_interval

    def attach(self, engine: Engine) -> None:
        from monai.handlers import CheckpointLoader, CheckpointSaver

        state = {**self.objects, "trainer": engine}
        if self.resume_from:
            print(f"Resuming from {self.resume_from}", flush=True)
            CheckpointLoader(load_path=self.resume_from, load_dict=state, map_location="cpu").attach(engine)
            engine.add_event_handler(Events.STARTED, self._report_finished)
        CheckpointSaver(self.ckpt_dir, state, save_interval=self.save_interval, n_saved=1).attach(engine)

    def _report_finished(self, engine: Engine) -> None:
        if engine.state.epoch >= engine.state.max_epochs:
            print(
                f"Nothing to train: {self.resume_from} is at epoch {engine.state.epoch} of max_epochs "
                f"{engine.state.max_epochs}. Pass --max_epochs N to train longer, or delete "
                f"{os.path.join(self.ckpt_dir, 'checkpoint_epoch=*.pt')} (or pass --resume_from None) to start afresh.",
                flush=True,
            )


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
        print(f"SAM weights (official key layout, {self.dtype}) written to {os.path.abspath(self.path)}: "
              f"{size_mb:.1f} MiB, md5 {md5}", flush=True)
        if self.run is not None and self.tracking_uri:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(self.tracking_uri)
            client.set_tag(self.run.info.run_id, "sam_checkpoint", os.path.abspath(self.path))
            client.set_tag(self.run.info.run_id, "sam_checkpoint_md5", md5)
