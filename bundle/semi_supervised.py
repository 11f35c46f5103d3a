"""The trainer of paper 003's semi-supervised schedule (docs/virtual_annotator.md): one MONAI / Ignite engine whose
iteration is the supervised objective in stage 1 and the virtual annotator's ranked DPO in stage 2.

Stage 1 (labelled images): SAM's own objective of :mod:`bundle.pretraining` with the task's target G for every
prompt set: focal : Dice 20 : 1 on the best of the M = 3 masks, plus the IoU-head MSE (``SingleObjectLoss``; paper
003: "a 20:1 weighted combination of focal loss and Dice loss"), optional corrective-click rounds.

Stage 2 (unlabelled images), per image and prompt set S (the clicks a user would give, drawn as in training):

1. the actor (adapters on) and the reference (adapters off = the stage-1 model, see :mod:`bundle.stage_schedule`)
   decode S; the item's logits z are those of the slot with the actor's highest predicted IoU (what a user gets),
   z_ref the reference's logits in that slot, both upsampled to the loss grid (the trainer's ``loss_size``;
   default G's size; G area-downsampled to it and thresholded at 0.5 for the rater);
2. :class:`bundle.virtual_annotator.VirtualAnnotator` thresholds sigmoid(z) into candidates and rates them
   against G -- the only place G enters stage 2 (it also feeds the training Dice / IoU, which are logged for
   monitoring and steer nothing);
3. :class:`bundle.virtual_annotator.RankedDPOLoss` (eq. 5) on the actor's and reference's log-likelihoods.

The stage is :attr:`SemiSupervisedTrainer.stage`, switched by :class:`bundle.stage_schedule.TwoStageSchedule`.
Epochs of the two stages have different lengths (labelled vs unlabelled images), so the engine's saved state holds
its epoch count (Ignite derives it as iteration // epoch_length, which assumes one length) and it is done after
``max_epochs`` epochs whatever the iteration count.
"""

from __future__ import annotations

from collections.abc import Mapping

from bundle.engines import decode_actor_and_reference
from bundle.networks.decoding import best_slot, loss_grid, to_grid, upsample
from bundle.pretraining import SingleObjectTrainer
from bundle.reference_cache import ReferenceEmbeddingCache
from bundle.virtual_annotator import RankedDPOLoss, VirtualAnnotator


class SemiSupervisedTrainer(SingleObjectTrainer):
    """Stage 1: :class:`bundle.pretraining.SingleObjectTrainer` with G as every prompt set's target; stage 2: the
    virtual annotator's ranked DPO (module docstring).

    Args:
        annotator: the :class:`VirtualAnnotator` (candidates and rater) of stage 2.
        alignment_loss: the :class:`RankedDPOLoss` of stage 2.
        the rest: as :class:`bundle.pretraining.SingleObjectTrainer`; ``loss_function`` is the stage-1
            ``SingleObjectLoss``, ``label`` is G (B, 1, H, W), ``points`` / ``point_labels`` the N prompt sets of
            :class:`bundle.transforms.prompts.PromptSetsd`.
        reference_cache: a :class:`bundle.reference_cache.ReferenceEmbeddingCache` for stage 2's reference (the
            stage-1 model: the fold at the boundary changes the base, which drops entries computed before it);
            ``None`` (default): encoded every batch.
    """

    def __init__(self, *args, annotator: VirtualAnnotator, alignment_loss: RankedDPOLoss,
                 reference_cache: ReferenceEmbeddingCache | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.reference_cache = reference_cache
        if annotator.rater != alignment_loss.rater:
            raise ValueError(f"the annotator rates with {annotator.rater!r} but the loss expects "
                             f"{alignment_loss.rater!r}: give both the same rater")
        self.annotator, self.alignment_loss = annotator, alignment_loss
        self.stage = 1

    def compute_loss(self, images, targets, points, labels):
        if self.stage == 1:
            goal = targets[:, :1].expand(-1, points.shape[1], -1, -1)
            preds, goal, out = super().compute_loss(images, goal, points, labels)
        else:
            preds, out = self.align(images, targets[:, :1], points, labels)
            goal = targets[:, :1].expand_as(preds)
        out["stage"] = preds.new_tensor(float(self.stage))
        return preds, goal, out

    def align(self, images, targets, points, labels):
        """Stage 2 on one batch: (the items' actor logits (B, N, H, W), loss terms)."""
        size = tuple(targets.shape[-2:])
        low, iou_pred, ref_low = self.network_pass(decode_actor_and_reference, images, points, labels, size,
                                                   reference_cache=self.reference_cache)
        grid = loss_grid(self.loss_size, size)  # stage 2 computes its loss on stage 1's grid
        chosen = iou_pred.detach()
        logits = upsample(best_slot(low, chosen), grid)
        ref_logits = upsample(best_slot(ref_low, chosen), grid)
        candidates = self.annotator.candidates(logits)  # binarised on the loss grid
        ranking = self.annotator(candidates, to_grid(targets, grid) > 0.5)  # G: here and nowhere else
        preds = logits if grid == size else upsample(best_slot(low, chosen), size)
        return preds, self.alignment_loss(logits, ref_logits, candidates, ranking)

    # -- epochs of different lengths ---------------------------------------------------------------------------------
    def state_dict(self):
        state = super().state_dict()
        state["epochs_done"] = self.state.epoch
        return state

    def load_state_dict(self, state_dict: Mapping) -> None:
        state = dict(state_dict)
        done = state.pop("epochs_done", None)
        super().load_state_dict(state)
        if done is not None:
            self.state.epoch = int(done)

    @staticmethod
    def _is_done(state) -> bool:
        if state.max_iters is not None and state.iteration >= state.max_iters:
            return True
        return state.max_epochs is not None and state.epoch >= state.max_epochs
