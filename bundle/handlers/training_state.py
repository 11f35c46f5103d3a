"""Save the training state after every epoch (adapter-sized, :mod:`bundle.checkpoints`) and resume from it, best
metric and LR schedule included."""

from __future__ import annotations

import glob
import logging
import math
import os
import re

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from bundle.checkpoints import BaseModel, TrainedWeights, read_training_state

logger = logging.getLogger(__name__)


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
        task: the task trained, recorded with the network's architecture (:func:`bundle.checkpoints.architecture`).
        validator, best_saver: the validation engine and its best-model ``CheckpointSaver``.
        save_interval: epochs between saves.
        save: False to only resume (the ranks other than 0 of a distributed run: rank 0 writes the state).
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
        save: bool = True,
        task: str | None = None,
    ) -> None:
        self.ckpt_dir, self.resume_from, self.save_interval = ckpt_dir, resume_from, save_interval
        self.saves = save
        self.optimizer, self.lr_scheduler = optimizer, lr_scheduler
        self.objects = {"base": BaseModel(network, sam_checkpoint, seed, task), "network": TrainedWeights(network),
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
        if self.saves and not engine.has_event_handler(self.save):  # last of the end-of-epoch handlers
            engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)

    def load(self, engine: Engine) -> None:
        path = self.resume_from
        ckpt = read_training_state(path)
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
