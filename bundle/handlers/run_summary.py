"""At the end of training, what was trained (or why nothing was) and where the checkpoints and the MLflow run are."""

from __future__ import annotations

import logging
import os

from ignite.engine import Engine, Events

from bundle.checkpoints import latest_checkpoint
from bundle.networks.bases import describe

logger = logging.getLogger(__name__)


class RunSummary:
    """At the end of training, log where the checkpoints and the MLflow run are, and how to open them.

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
        note = describe(self.initialisation)
        if note:
            logger.warning("NOTE: %s.", note)

    @staticmethod
    def what_happened(engine: Engine) -> str:
        """``Trained epochs a..b of N (fresh start | resumed from X)`` or ``Nothing to train: ...``."""
        state = engine.state
        first, resumed = getattr(state, "first_epoch", 1), getattr(state, "resumed_from", None)
        if first > state.max_epochs:
            return f"Nothing to train: already at epoch {first - 1} of {state.max_epochs} (state {resumed})."
        how = f"resumed from {resumed}" if resumed else "fresh start"
        return f"Trained epochs {first}..{state.epoch} of {state.max_epochs} ({how})."

    def completed(self, engine: Engine) -> None:
        lines = ["", "Training finished.", "  " + self.what_happened(engine)]
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
        note = describe(self.initialisation)
        if note:
            lines.append(f"  (started from: {note})")
        logger.info("\n".join(lines))
