"""Paper 003's two-stage schedule as one bundle run (docs/virtual_annotator.md): epochs 1..S1 supervised on the
labelled images, epochs S1+1..S1+S2 aligned on the unlabelled ones, in one engine and one MLflow run.

At the start of epoch S1 + 1 (:meth:`TwoStageSchedule.enter_stage2`):

* the stage-1 adapters are folded into the base weights and fresh ones start (:func:`bundle.networks.lora.
  fold_adapters`), so the reference policy (adapters off) *is* the stage-1 model, with no second copy;
* the optimiser's moments are cleared (a new objective on re-initialised adapters);
* the trainer switches to the unlabelled loader, its epoch length and its stage-2 objective.

Saving and resuming: the stage-1 trained tensors (adapter-sized) are part of every later training state and
``best_model.pt`` under the key ``stages``, beside ``base`` (the base the run started from) and ``network`` (the
stage-2 tensors). Loading such a file onto a network built from that base redoes the fold first
(:meth:`TwoStageSchedule.load_state_dict`, :func:`bundle.export.load_weights`), so a run resumes on either side of
the boundary and evaluation / export read stage-2 checkpoints like any other.

The learning rate follows a cosine per stage (:func:`stage_cosine`), restarting at the boundary as the paper's
schedule restarts with each stage.
"""

from __future__ import annotations

import logging
import math

import torch
from ignite.engine import Engine, Events

from bundle.checkpoints import BaseModel, TrainedWeights, fold_stage1, load_trained
from bundle.engines import loss_terms
from bundle.handlers.export_bundle import ExportBundle
from bundle.handlers.training_state import TrainingState
from bundle.networks.lora import fold_adapters

logger = logging.getLogger(__name__)


def stage_cosine(stage1_epochs: int, stage2_epochs: int):
    """LR factor of ``LambdaLR`` after ``e`` finished epochs: (1 + cos(pi e / S1)) / 2 in stage 1, then
    (1 + cos(pi (e - S1) / S2)) / 2 (each stage a cosine from the full learning rate). A plain function, so that
    ``LambdaLR``'s saved state keeps only its position and a resumed run takes the configured stage lengths."""

    def factor(epoch: int) -> float:
        start, length = (0, stage1_epochs) if epoch < stage1_epochs else (stage1_epochs, max(stage2_epochs, 1))
        return (1 + math.cos(math.pi * (epoch - start) / length)) / 2

    return factor


def _epochs(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


class TwoStageSchedule:
    """The stage boundary of the semi-supervised run (module docstring), saved with the training state.

    Args:
        stage1_epochs: S1, epochs of supervised training on the labelled loader (the trainer's own).
        network: the trained :class:`bundle.networks.PromptableSAM` (LoRA rank >= 1: the reference is adapters off).
        optimizer: its optimiser (moments cleared at the boundary).
        unlabelled_loader: batches of the unlabelled images for stage 2 (None when the run has no stage 2).
        sam_checkpoint, seed: the base the network was built from (``base`` of the checkpoints, as TrainingState).
        fold_seed: seed of the fresh adapters' initialisation at the boundary.

    ``base`` is the checkpoints' :class:`bundle.checkpoints.BaseModel`, recorded here before any fold (give it to
    the best-model saver); the trainer's ``max_epochs`` is S1 + S2.
    """

    def __init__(self, stage1_epochs: int, network, optimizer, unlabelled_loader=None,
                 sam_checkpoint: str | None = None, seed: int | None = None, fold_seed: int = 0) -> None:
        self.stage1_epochs = _epochs("stage1_epochs", stage1_epochs, 1)
        if getattr(network, "lora_rank", 0) < 1:
            raise ValueError("the two-stage schedule needs lora_rank >= 1: stage 2's reference is the network with "
                             f"its adapters off, got lora_rank {getattr(network, 'lora_rank', None)}")
        self.network, self.optimizer, self.unlabelled_loader = network, optimizer, unlabelled_loader
        self.fold_seed = fold_seed
        self.base = BaseModel(network, sam_checkpoint, seed)
        self.base.state_dict()  # recorded now, before any fold changes the base tensors
        self.stage1: dict[str, torch.Tensor] | None = None  # the folded stage-1 tensors, once folded
        self.source = "checkpoint"  # the file being loaded, for messages (set by StagedTrainingState)
        self.labelled_loader = None

    # -- events --------------------------------------------------------------------------------------------------
    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.started)
        engine.add_event_handler(Events.EPOCH_STARTED, self.epoch_started)

    def started(self, engine: Engine) -> None:
        """After a resume (TrainingState's STARTED handler runs first): the loader and stage of the next epoch."""
        max_epochs = engine.state.max_epochs
        stage2 = max_epochs - self.stage1_epochs
        if stage2 < 0:
            raise ValueError(f"max_epochs {max_epochs} is less than stage1_epochs {self.stage1_epochs}: the trainer "
                             "runs stage1_epochs + stage2_epochs epochs")
        if stage2 and (self.unlabelled_loader is None or len(self.unlabelled_loader) == 0):
            raise ValueError(f"stage 2 ({stage2} epochs) needs unlabelled images, and the unlabelled loader is empty")
        self.labelled_loader = engine.data_loader
        logger.info("Two-stage schedule: epochs 1..%d supervised on %d labelled images%s", self.stage1_epochs,
                    len(self.labelled_loader.dataset),
                    f", epochs {self.stage1_epochs + 1}..{max_epochs} aligned on {len(self.unlabelled_loader.dataset)}"
                    " unlabelled images (virtual annotator)" if stage2 else " (no alignment stage)")
        if engine.state.epoch < max_epochs:  # at the boundary stage 1's loader stays until the fold switches it
            self._use(engine, 1 if self.stage1 is None else 2)

    def epoch_started(self, engine: Engine) -> None:
        epoch = engine.state.epoch
        engine.state.epoch_first_iteration = engine.state.iteration + 1
        if epoch == self.stage1_epochs + 1 and self.stage1 is None:
            self.enter_stage2(engine)

    def enter_stage2(self, engine: Engine) -> None:
        """Fold the stage-1 adapters (reference := stage-1 model), clear the optimiser, switch data and objective."""
        self.stage1 = {k: v.detach().clone() for k, v in TrainedWeights(self.network).state_dict().items()}
        fold_adapters(self.network.sam, self.fold_seed)
        self.optimizer.state.clear()
        logger.info("Stage 2 from epoch %d: stage-1 adapters folded into the base (the reference is now the stage-1 "
                    "model), fresh adapters, optimiser moments cleared", engine.state.epoch)
        self._use(engine, 2)

    def _use(self, engine: Engine, stage: int) -> None:
        loader = self.labelled_loader if stage == 1 else self.unlabelled_loader
        engine.stage = stage
        engine.set_data(loader)  # a fresh iterator: the epoch counts its iterations from 0
        engine.state.epoch_length = len(loader)

    # -- saved with the training state ---------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"folded": self.stage1 is not None, "stage1": dict(self.stage1 or {}),
                "stage1_epochs": self.stage1_epochs}

    def load_state_dict(self, state: dict, source: str | None = None) -> None:
        """Redo the fold of a saved stage-2 state on this network (built from the run's original base), keeping
        the tensors loaded into it so far (the stage-2 ones, loaded before or after this)."""
        source = source or self.source
        if not state.get("folded") or self.stage1 is not None:
            return
        saved = state.get("stage1_epochs", self.stage1_epochs)
        if saved != self.stage1_epochs:  # stage 2 began after `saved` epochs: they cannot be stage 1 again
            raise ValueError(f"{source}: stage 2 of this state began after stage1_epochs {saved} (max_epochs), this "
                             f"run has {self.stage1_epochs}: resume with --max_epochs {saved}, or start afresh with "
                             "--resume_from None")
        keep = {k: v.detach().clone() for k, v in TrainedWeights(self.network).state_dict().items()}
        fold_stage1(self.network, state["stage1"], source, self.fold_seed)
        load_trained(self.network, keep, source)
        self.stage1 = dict(state["stage1"])


class StagedTrainingState(TrainingState):
    """:class:`bundle.handlers.TrainingState` that also saves and restores the :class:`TwoStageSchedule` (key
    ``stages``) and records the base through it (before any fold). Arguments as TrainingState, plus ``schedule``."""

    def __init__(self, *args, schedule: TwoStageSchedule, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.objects["base"] = schedule.base
        self.objects["stages"] = schedule

    def load(self, engine: Engine) -> None:
        self.objects["stages"].source = self.resume_from
        super().load(engine)


class StagedExport(ExportBundle):
    """:class:`bundle.handlers.ExportBundle` for the two-stage run: the checkpoint (``best_model.pt``) is loaded onto
    ``base_network``, a network built on the run's original base (a stage-2 file folds its stage 1 there; the
    trained network's own base is folded and would be refused); without a checkpoint of this run the trained
    network itself is exported, as ExportBundle does. Arguments as ExportBundle, plus ``base_network``."""

    def __init__(self, *args, base_network=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.base_network = base_network

    def _network(self, engine: Engine):
        self.network = self.base_network
        try:
            chosen = super()._network(engine)
        finally:
            self.network = None
        return engine.network if chosen is self.base_network else chosen


def log_iteration(engine: Engine) -> None:
    """StatsHandler ``iteration_print_logger``: ``Epoch: e/E, Iter: i/I, stage s -- train_loss: x``, the iteration
    counted within the epoch (epochs of the two stages differ in length)."""
    state = engine.state
    first = getattr(state, "epoch_first_iteration", 1)
    terms = loss_terms(state.output)
    logger.info("Epoch: %d/%d, Iter: %d/%d, stage %d -- train_loss: %.4f", state.epoch, state.max_epochs,
                       state.iteration - first + 1, state.epoch_length, getattr(engine, "stage", 1),
                       terms.get("loss", float("nan")))
