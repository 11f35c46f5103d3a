"""Small Ignite handlers of the bundle (MONAI's handlers do the rest).

* :class:`RunSummary`: at the end, what was trained (or why nothing was) and where the checkpoints and run are.
* :class:`TrainingState`: save the training state after every epoch (adapter-sized, :mod:`bundle.checkpoints`),
  resume from it, best metric and LR schedule included.
* :class:`NonFiniteGuard`: stop before the optimiser step when the loss or a gradient is not finite.
* :class:`StartMessage`: Ignite says "Engine run resuming from iteration 0" when a MONAI engine starts; say
  "starting" instead (the resume, if any, is reported by :class:`TrainingState`).
"""

from __future__ import annotations

import glob
import logging
import math
import os
import re

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.engines.utils import IterationEvents

from bundle.checkpoints import BaseModel, TrainedWeights
from bundle.engines import LOGGED_TERMS, latest_checkpoint
from bundle.networks import CheckpointError
from bundle.networks.bases import describe

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
        note = describe(self.initialisation)
        if note:
            print(f"NOTE: {note}.")

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
        print("\n".join(lines), flush=True)




class _BestMetric:
    """``state_dict`` / ``load_state_dict`` of an engine's best key metric (MONAI keeps it in ``engine.state``, which
    Ignite's ``Engine.state_dict`` leaves out) and of the ``CheckpointSaver`` that keeps the best model."""

    def __init__(self, engine: Engine, saver=None) -> None:
        self.engine, self.saver = engine, saver

    def _saved(self):
        """The saver's Ignite ``Checkpoint`` (MONAI's ``CheckpointSaver`` has ``load_state_dict``, no ``state_dict``)."""
        return getattr(self.saver, "_key_metric_checkpoint", None)

    def state_dict(self) -> dict:
        state = {"best_metric": float(self.engine.state.best_metric), "best_metric_epoch": int(self.engine.state.best_metric_epoch)}
        checkpoint = self._saved()
        if checkpoint is not None:  # Ignite's Checkpoint.Item is a namedtuple: plain tuples load with weights_only
            state["saved"] = [(float(p), str(f)) for p, f in checkpoint.state_dict()["_saved"]]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.engine.state.best_metric = state["best_metric"]
        self.engine.state.best_metric_epoch = state["best_metric_epoch"]
        checkpoint = self._saved()
        saved = state.get("saved") or []
        if checkpoint is not None and saved:
            fixed = getattr(checkpoint.save_handler, "filename", None)
            on_disk = [f for _, f in saved if os.path.isfile(os.path.join(self.saver.save_dir, fixed or f))]
            if len(on_disk) == len(saved):  # a best file deleted by hand is simply written again
                self.saver.load_state_dict({"_saved": saved})


class TrainingState:
    """Save the training state after every ``save_interval`` epochs and resume from ``resume_from`` at start.

    The state is what an uninterrupted run has in memory at the end of the epoch: the trained weights and the base
    they apply to (:mod:`bundle.checkpoints`), optimiser, LR scheduler (after its step for the epoch), trainer, and
    the best key metric of trainer and validator with the validator's best-model saver (Ignite ``Checkpoint``'s
    ``include_self`` / MONAI ``CheckpointSaver(key_metric_save_state=True)`` semantics), so a resumed run reports
    a new best only when it is better and keeps ``best_model.pt`` otherwise.

    The save is registered when the run starts, so it runs after every other end-of-epoch handler (validation, LR
    step, MLflow commit); it writes ``checkpoint_epoch=N.pt.partial`` then renames it, and only then removes the
    older ``checkpoint_epoch=*.pt`` (a kill at any moment leaves a complete newest state). Loading restores the
    objects with Ignite's ``Checkpoint.load_objects``, keeping the configured ``max_epochs`` as MONAI's
    ``CheckpointLoader`` does; a ``CosineAnnealingLR`` is stretched to a larger ``max_epochs`` (its ``T_max`` is the
    configured one, its position the saved one).

    Args:
        ckpt_dir: folder of the ``checkpoint_epoch=N.pt`` files (the newest one is kept).
        network: the trained :class:`~bundle.networks.PromptableSAM`.
        optimizer, lr_scheduler: saved and restored with it.
        resume_from: a saved state to load before training starts, or None to start afresh.
        sam_checkpoint, seed: the base the network was built from (named in the checkpoint).
        validator, best_saver: the validation engine and its best-model ``CheckpointSaver``.
        save_interval: epochs between saves.
    """

    def __init__(
        self,
        ckpt_dir: str,
        network: torch.nn.Module,
        optimizer,
        lr_scheduler=None,
        resume_from: str | None = None,
        sam_checkpoint: str | None = None,
        seed: int | None = None,
        validator: Engine | None = None,
        best_saver=None,
        save_interval: int = 1,
    ) -> None:
        self.ckpt_dir, self.resume_from, self.save_interval = ckpt_dir, resume_from, save_interval
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.objects = {"base": BaseModel(network, sam_checkpoint, seed), "network": TrainedWeights(network),
                        "optimizer": optimizer}
        if lr_scheduler is not None:
            self.objects["lr_scheduler"] = lr_scheduler
        self.validator, self.best_saver = validator, best_saver

    def attach(self, engine: Engine) -> None:
        self.objects["trainer"] = engine
        self.objects["trainer_best"] = _BestMetric(engine)
        if self.validator is not None:
            self.objects["validator_best"] = _BestMetric(self.validator, self.best_saver)
        engine.add_event_handler(Events.STARTED, self.started)

    def started(self, engine: Engine) -> None:
        engine.state.resumed_from = None
        if self.resume_from:
            self.load(engine)
        engine.state.first_epoch = engine.state.epoch + 1
        if not engine.has_event_handler(self.save):  # last of the end-of-epoch handlers
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)

    def load(self, engine: Engine) -> None:
        path = self.resume_from
        fresh = "pass --resume_from None to start afresh"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"resume_from: training state not found: {path} ({fresh})")
        try:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # truncated, not a torch file, pickled code
            raise CheckpointError(
                f"resume_from: {path} is not a readable training state ({type(e).__name__}: {str(e).splitlines()[0]}); "
                f"resume from an earlier checkpoint_epoch=N.pt or {fresh}"
            ) from e
        if not isinstance(ckpt, dict) or "network" not in ckpt or "trainer" not in ckpt:
            keys = list(ckpt)[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
            raise CheckpointError(f"resume_from: {path} is not a training state (keys {keys}; expected network, "
                                  f"optimizer, trainer, ... as in checkpoint_epoch=N.pt); {fresh}")
        t_max = getattr(self.lr_scheduler, "T_max", None)
        max_epochs = engine.state.max_epochs
        if "base" in ckpt:  # first: another base fails here, with a message that names both
            self.objects["base"].load_state_dict(ckpt["base"], source=path)
        else:
            logger.warning("%s names no base model (written before adapter-sized checkpoints): loading it whole", path)
        self.objects["network"].load_state_dict(ckpt["network"], source=path)
        rest = {k: v for k, v in self.objects.items() if k not in ("base", "network") and k in ckpt}
        for key in sorted(set(self.objects) - set(rest) - {"base", "network"}):
            logger.warning("%s has no '%s' (an older checkpoint): it starts afresh", path, key)
        Checkpoint.load_objects(to_load=rest, checkpoint=ckpt)
        epoch = engine.state.epoch
        if max_epochs is not None and epoch > max_epochs:
            raise ValueError(
                f"{path} is at epoch {epoch}, beyond max_epochs {max_epochs}: pass --max_epochs {epoch} or more to "
                f"train on, or --resume_from None to start afresh"
            )
        engine.state.max_epochs = max_epochs
        engine.state.resumed_from = path
        if t_max is not None and self.lr_scheduler.T_max != t_max:
            self._stretch(self.lr_scheduler.T_max, t_max)
        best = ""
        if self.validator is not None and self.validator.state.best_metric_epoch > 0:
            v = self.validator.state
            best = f"; best {v.key_metric_name} {v.best_metric:.4f} at epoch {v.best_metric_epoch}"
        logger.info("Resuming from %s: epoch %d of %d done%s", path, epoch, max_epochs, best)
        if epoch >= max_epochs:
            logger.warning(
                "Nothing to train: %s is at epoch %d of max_epochs %d. Pass --max_epochs N to train longer, or delete "
                "%s (or pass --resume_from None) to start afresh.", path, epoch, max_epochs,
                os.path.join(self.ckpt_dir, "checkpoint_epoch=*.pt"),
            )

    def _stretch(self, saved: int, t_max: int) -> None:
        sched = self.lr_scheduler
        sched.T_max = t_max
        for group, base in zip(self.optimizer.param_groups, sched.base_lrs):
            group["lr"] = sched.eta_min + (base - sched.eta_min) * (1 + math.cos(math.pi * sched.last_epoch / t_max)) / 2
        sched._last_lr = [g["lr"] for g in self.optimizer.param_groups]
        logger.warning(
            "max_epochs is %d, the saved cosine schedule ran over %d: stretched to %d epochs, the next epoch trains at "
            "lr %.4g", t_max, saved, t_max, self.optimizer.param_groups[0]["lr"],
        )

    def save(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        path = os.path.join(self.ckpt_dir, f"checkpoint_epoch={epoch}.pt")
        os.makedirs(self.ckpt_dir, exist_ok=True)
        state = {key: obj.state_dict() for key, obj in self.objects.items()}
        torch.save(state, path + ".partial")
        os.replace(path + ".partial", path)
        for old in glob.glob(os.path.join(glob.escape(self.ckpt_dir), "checkpoint_epoch=*.pt")):
            if os.path.abspath(old) != os.path.abspath(path) and re.search(r"epoch=\d+\.pt$", old):
                os.remove(old)
        logger.info("Saved the training state of epoch %d: %s", epoch, path)


class NonFiniteGuard:
    """Stop training when the loss or a gradient is not finite, before the optimiser step uses it.

    Raises ``FloatingPointError`` naming the iteration, the epoch and the loss terms (or the parameters whose
    gradients are not finite) and the last good training state; nothing of the failing epoch is saved, so
    ``best_model.pt`` and ``checkpoint_epoch=N.pt`` keep their last finite weights.

    Args:
        ckpt_dir: folder of the saved training states (named in the error).
    """

    def __init__(self, ckpt_dir: str) -> None:
        self.ckpt_dir = ckpt_dir

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.check_loss)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.check_gradients)

    def _where(self, engine: Engine) -> str:
        state = engine.state
        in_epoch = (state.iteration - 1) % state.epoch_length + 1 if state.epoch_length else state.iteration
        return f"iteration {state.iteration} (epoch {state.epoch}, iteration {in_epoch} of {state.epoch_length})"

    def _stop(self, engine: Engine, what: str) -> None:
        latest = latest_checkpoint(self.ckpt_dir)
        good = f"the last good state: {latest}" if latest else "no training state was saved yet"
        raise FloatingPointError(
            f"{what}. Training stopped before the optimiser step; nothing of this epoch is saved, {good}. Lower "
            "learning_rate or beta, or check the inputs, then run again (it resumes from the last good state)."
        )

    def check_loss(self, engine: Engine) -> None:
        output = engine.state.output
        loss = output.get("loss") if isinstance(output, dict) else None
        if isinstance(loss, torch.Tensor) and not torch.isfinite(loss).all():
            terms = ", ".join(f"{k}={float(output[k]):.4g}" for k in LOGGED_TERMS if isinstance(output.get(k), torch.Tensor))
            self._stop(engine, f"Non-finite training loss at {self._where(engine)}: {terms}")

    def check_gradients(self, engine: Engine) -> None:
        bad = [n for n, p in engine.network.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            self._stop(engine, f"Non-finite gradients at {self._where(engine)} in {len(bad)} parameters (e.g. {bad[:3]})")


class StartMessage:
    """Replace Ignite's "Engine run resuming from iteration 0, epoch E until M epochs", logged whenever a MONAI
    engine starts (its state exists before ``run``), by "Engine run starting at epoch E+1 of M"."""

    PATTERN = re.compile(r"Engine run resuming from iteration 0, epoch (\d+) until (\d+) epochs")

    def attach(self, engine: Engine) -> None:
        engine.logger.addFilter(self.filter)

    def filter(self, record: logging.LogRecord) -> bool:
        match = self.PATTERN.fullmatch(record.getMessage())
        if match:
            record.msg, record.args = "Engine run starting at epoch %d of %s", (int(match[1]) + 1, match[2])
        return True


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
