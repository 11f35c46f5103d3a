"""The SAMPO preference trainer: a MONAI ``Trainer`` with its own iteration, as MONAI's ``GanTrainer``.

:class:`PromptTrainer` is the iteration shared with the pretraining objective (:mod:`bundle.pretraining`): batch to
the device, the objective's loss, MONAI's iteration events, one optimiser step. :class:`SAMPOTrainer` is its
preference objective.

One iteration, for a batch of images with N prompt sets each (METHOD.md):

1. the actor encodes every image once (LoRA on); the reference encodes them once (adapters off, no grad), or
   serves an image it has seen from its ``reference_cache`` (:mod:`bundle.reference_cache`, float16 copies);
2. the B x N prompt sets go through prompt encoder + mask decoder, M = 3 masks each, for the actor and for the
   reference, each set with exactly its clicks plus SAM's padding point (:mod:`bundle.networks.decoding`);
3. :class:`bundle.preference.SAMPOLoss` mines inter- and intra-prompt pairs and returns the hybrid loss, its
   preference terms pooled over the valid pairs of the whole batch;
4. one optimiser step (or one every ``accumulate_grad_batches`` batches).

Distributed (``distributed``, :mod:`bundle.distributed`): every network pass of an iteration goes through one
``DistributedDataParallel`` forward (:meth:`PromptTrainer.network_pass`), so that DDP prepares its gradient
all-reduce although the objectives call ``encode`` / ``decode`` rather than ``forward``.

Mixed precision (``amp``): the network's forward passes run under ``torch.autocast`` (``amp_dtype`` bfloat16 or
float16); their outputs are cast back to float32 before the loss, so the preference log-likelihoods, BCE and Dice
are computed in float32. float16 needs a CUDA device and a ``GradScaler``; bfloat16 needs no scaler.
Gradient accumulation: with k = ``accumulate_grad_batches`` each batch's loss is divided by the size n of its group
(k, or fewer for the last group of an epoch) and the optimiser steps once per group, so a group of n batches of size b
gives the gradient of the mean of their n losses (for the SUP and IoU-head terms, the gradient of one batch of n * b;
the preference terms are pooled per batch, as METHOD.md pools them per step). Groups never cross an epoch.

The output holds ``loss`` and its terms for the handlers, and ``pred`` / ``label`` for the training Dice / IoU:
``pred`` (B, N, H, W) has one channel per prompt set (its best predicted-IoU mask), ``label`` is G repeated, so the
metrics average over every prompt set.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from monai.engines import Trainer
from monai.engines.utils import IterationEvents, default_metric_cmp_fn
from monai.utils import min_version, optional_import
from monai.utils import CommonKeys
from torch.optim import Optimizer

Events, _ = optional_import("ignite.engine", "0.4.11", min_version, "Events")
from torch.utils.data import DataLoader

from bundle.checkpoints import latest_checkpoint  # noqa: F401  (configs/train.yaml: bundle.engines.latest_checkpoint)
from bundle.dpo import TERMS as DPO_TERMS
from bundle.networks import PromptableSAM
from bundle.networks.decoding import best_slot, loss_grid, to_grid, upsample
from bundle.reference_cache import ReferenceEmbeddingCache

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# SAMPO's and paper 003's terms, then the human pairs' (bundle/human_pairs.py: the same names prefixed human_)
LOGGED_TERMS = ("loss", "po1", "po2", "sup", "iou_head", *DPO_TERMS, "gradient_ratio", "focal", "dice_loss",
                "stage", "human_dpo", "human_sup", *(f"human_{t}" for t in DPO_TERMS))


class PromptTrainer(Trainer):
    """A MONAI ``Trainer`` for :class:`bundle.networks.PromptableSAM` on batches of images with point prompts.

    One iteration: move the batch to the device, :meth:`compute_loss` (the objective, defined by subclasses), fire
    MONAI's iteration events, one optimiser step. The output holds ``pred`` / ``label`` for the metrics and the loss
    terms for the handlers.

    Args:
        device: device to train on.
        max_epochs: number of epochs.
        train_data_loader: yields dicts with ``image`` (B, C, H, W), ``label`` (B, L, H, W), ``points``
            (B, N, P, 2) and ``point_labels`` (B, N, P).
        network: the network to train.
        optimizer: optimiser over the trainable parameters.
        loss_function: the objective's loss module, used by :meth:`compute_loss`.
        amp: run the network's forward passes under ``torch.autocast`` (module docstring).
        amp_dtype: ``bfloat16`` (CPU, or a GPU that supports it) or ``float16`` (CUDA, with a ``GradScaler``).
        accumulate_grad_batches: optimiser step every this many batches (gradient accumulation), >= 1.
        distributed: average gradients over the ranks of the initialised process group (DDP; torchrun).
        the rest: as :class:`monai.engines.Trainer`.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: DataLoader,
        network: PromptableSAM,
        optimizer: Optimizer,
        loss_function: Callable,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        decollate: bool = True,
        optim_set_to_none: bool = False,
        amp: bool = False,
        amp_dtype: str = "bfloat16",
        accumulate_grad_batches: int = 1,
        distributed: bool = False,
    ) -> None:
        check_amp(device, amp, amp_dtype)
        if isinstance(accumulate_grad_batches, bool) or not isinstance(accumulate_grad_batches, int) \
                or accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be an integer >= 1 (the optimiser steps once every that "
                             f"many batches; 1 = every batch), got {accumulate_grad_batches!r}")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            postprocessing=postprocessing,
            decollate=decollate,
        )
        self.network = network
        self.optimizer = optimizer
        self.loss_function = loss_function
        self.optim_set_to_none = optim_set_to_none
        self.amp, self.amp_dtype = bool(amp), AMP_DTYPES[amp_dtype]
        self.accumulate_grad_batches = accumulate_grad_batches
        self.scaler = torch.amp.GradScaler("cuda") if self.amp and self.amp_dtype == torch.float16 else None
        self.ddp = _ddp(network, device) if distributed else None
        self._epoch_start = 0  # state.iteration before the current epoch's first batch (epochs may differ in length)
        self.add_event_handler(Events.EPOCH_STARTED, lambda e: setattr(e, "_epoch_start", e.state.iteration))

    def network_pass(self, fn: Callable, *args, **kwargs) -> Any:
        """``fn(network, *args, **kwargs)``: the iteration's network passes, through DDP's forward when
        ``distributed`` and under autocast when ``amp`` is on (floating-point tensors in the result, alone or in
        tuples and lists, come back as float32 for the loss)."""
        call = self.ddp if self.ddp is not None else (lambda f, *a, **k: f(self.network, *a, **k))
        if not self.amp:
            return call(fn, *args, **kwargs)
        with torch.autocast(torch.device(self.state.device).type, dtype=self.amp_dtype):
            out = call(fn, *args, **kwargs)
        return _to_float32(out)

    def accumulation_group(self) -> tuple[bool, bool, int]:
        """For the current iteration: (first of its group, last of its group, group size n); groups of
        ``accumulate_grad_batches`` batches counted from the start of each epoch, the last one possibly shorter."""
        k, length = self.accumulate_grad_batches, self.state.epoch_length
        if k == 1:
            return True, True, 1
        step = self.state.iteration - self._epoch_start  # 1-based position within the epoch
        start = step - (step - 1) % k
        n = min(k, length - start + 1)
        return step == start, step == start + n - 1, n
    def compute_loss(self, images: torch.Tensor, targets: torch.Tensor, points: torch.Tensor,
                     labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """The objective on one batch: (pred logits, their label, loss terms with ``loss``) (subclasses)."""
        raise NotImplementedError

    def _iteration(self, engine: PromptTrainer, batchdata: dict[str, Any]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        device, nb = engine.state.device, engine.non_blocking
        images = batchdata[CommonKeys.IMAGE].to(device, non_blocking=nb)
        targets = batchdata[CommonKeys.LABEL].to(device, non_blocking=nb)
        points = batchdata["points"].to(device, non_blocking=nb).float()
        labels = batchdata["point_labels"].to(device, non_blocking=nb)
        engine.network.train()
        first, last, group = engine.accumulation_group()
        if first:
            engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        preds, pred_labels, out = engine.compute_loss(images, targets, points, labels)
        engine.state.output = {CommonKeys.IMAGE: images, CommonKeys.LABEL: pred_labels, CommonKeys.PRED: preds.detach()}
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.state.output.update({k: v.detach() for k, v in out.items()})
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        loss = out["loss"] / group
        (engine.scaler.scale(loss) if engine.scaler else loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if last:
            if engine.scaler:
                engine.scaler.step(engine.optimizer)
                engine.scaler.update()
            else:
                engine.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)  # MONAI decollates the output here
        return engine.state.output


def check_amp(device: str | torch.device, amp: bool, amp_dtype: str) -> None:
    """Clear errors for mixed-precision settings the device cannot run."""
    if amp_dtype not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {sorted(AMP_DTYPES)}, got {amp_dtype!r}")
    if not amp:
        return
    kind = torch.device(device).type
    if kind not in ("cpu", "cuda"):
        raise ValueError(f"amp is supported on cpu (bfloat16) and cuda devices, not {device}: set amp false")
    if amp_dtype == "float16" and kind != "cuda":
        raise ValueError(f"amp with amp_dtype float16 needs a CUDA device (GradScaler); the device is {device}: "
                         "use amp_dtype bfloat16 on CPU, or amp false")
    if amp_dtype == "bfloat16" and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"amp with amp_dtype bfloat16: the GPU of {device} does not support bfloat16; "
                         "use amp_dtype float16")


class _NetworkPass(torch.nn.Module):
    """``fn(network, *args)`` as a module's forward: what :class:`~torch.nn.parallel.DistributedDataParallel` wraps."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, fn: Callable, *args, **kwargs) -> Any:
        return fn(self.network, *args, **kwargs)


def _ddp(network: torch.nn.Module, device) -> torch.nn.parallel.DistributedDataParallel:
    """DDP around ``network`` (rank 0's weights are broadcast to every rank here). ``find_unused_parameters``: SAM's
    prompt encoder has trainable parts a point-prompt step never uses (box corners, mask input)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("distributed: true needs an initialised process group: run under torchrun with "
                           "configs/multi_gpu_train.yaml (README: 'Several GPUs')")
    device = torch.device(device)
    ids = [device] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(_NetworkPass(network), device_ids=ids,
                                                     find_unused_parameters=True)


def _to_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_float32(o) for o in out)
    return out


def decode_actor_and_reference(net, images, points, labels, size, extra=None, reference_cache=None):
    """The prompt sets decoded by the actor and by pi_ref (adapters off, no gradients), each encoding the images
    once: (actor low-res logits (B, N, M, h, w), actor predicted IoU (B, N, M), reference low-res logits).
    All B x N prompt sets are decoded in one call per policy (no loop over images).

    ``reference_cache``: a :class:`bundle.reference_cache.ReferenceEmbeddingCache` that serves pi_ref's image
    embeddings of images it has seen (float16 copies); ``None``: the reference encodes the images every time.

    ``extra`` = (index (T,), points (T, 1, P', 2), labels (T, 1, P')): one more prompt set for the images ``index``
    (the human preference pairs of :mod:`bundle.human_pairs`), decoded from the same encodings; a fourth element
    (its actor logits (T, 1, M, h, w), actor IoUs (T, 1, M), reference logits) is then returned. The N prompt sets
    are decoded exactly as without it."""
    emb = net.encode(images)
    low, iou_pred = net.decode(emb, points, labels, input_size=size)
    with net.reference():
        ref_emb = net.encode(images) if reference_cache is None else reference_cache.encode(net, images)
        ref_low, _ = net.decode(ref_emb, points, labels, input_size=size)
        if extra is not None:
            ref_extra, _ = net.decode(ref_emb[extra[0]], extra[1], extra[2], input_size=size)
    if extra is None:
        return low, iou_pred, ref_low
    extra_low, extra_iou = net.decode(emb[extra[0]], extra[1], extra[2], input_size=size)
    return low, iou_pred, ref_low, (extra_low, extra_iou, ref_extra)


class SAMPOTrainer(PromptTrainer):
    """Preference-optimisation trainer for :class:`bundle.networks.PromptableSAM` (steps 1-3 of the module docstring).

    Arguments as :class:`PromptTrainer`; ``label`` is G (B, 1, H, W), ``points`` / ``point_labels`` the N prompt
    sets of :class:`bundle.transforms.prompts.PromptSetsd`, ``loss_function`` a :class:`bundle.preference.SAMPOLoss`.

    Args:
        human_loss: a :class:`bundle.human_pairs.HumanPairLoss`: the batch's human preference pairs (items with
            :class:`bundle.human_pairs.HumanPaird`'s keys and ``human_pair`` 1) add its term to the loss, their
            prompt decoded as one more prompt set of the same encodings; ``None`` (default): SAMPO alone.
        reference_cache: a :class:`bundle.reference_cache.ReferenceEmbeddingCache`: pi_ref's image embeddings
            computed once per image and reused in later epochs (float16); ``None`` (default): encoded every batch.
        loss_size: side of the square grid SAMPO's (and the human pairs') loss is computed on. ``None`` (default):
            G's size, the logits upsampled to it as SAM serves them. An integer, e.g. ``image_size // 4`` (the
            decoder's own grid): the logits are resized to it, G and the human pairs' masks area-downsampled to
            it (soft; the pair mining's IoU and the human masks threshold them at 0.5), so the candidates are
            binarised there. The training metrics score the best slot at G's size either way.
    """

    def __init__(self, *args, human_loss: torch.nn.Module | None = None,
                 reference_cache: ReferenceEmbeddingCache | None = None, loss_size: int | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.human_loss = human_loss
        self.reference_cache = reference_cache
        loss_grid(loss_size, (1, 1))  # a bad value stops here, before any step
        self.loss_size = loss_size

    def compute_loss(self, images, targets, points, labels):
        size = tuple(targets.shape[-2:])
        human = None if self.human_loss is None else self.human_loss.prompts(self.state.batch, images.device)
        if human is None:
            low, iou_pred, ref_low = self.network_pass(decode_actor_and_reference, images, points, labels, size,
                                                       reference_cache=self.reference_cache)
        else:
            low, iou_pred, ref_low, extra = self.network_pass(decode_actor_and_reference, images, points, labels,
                                                              size, human.prompt, reference_cache=self.reference_cache)
        grid = loss_grid(self.loss_size, size)
        logits, ref_logits = upsample(low, grid), upsample(ref_low, grid)
        out = self.loss_function(logits, ref_logits, to_grid(targets[:, 0], grid), iou_pred)
        out.pop("iou", None)
        if self.human_loss is not None:
            if human is None:
                terms = self.human_loss.empty(logits)
            else:
                h_low, h_iou, h_ref = extra
                terms = self.human_loss(upsample(h_low[:, 0], grid), upsample(h_ref[:, 0], grid), h_iou[:, 0],
                                        to_grid(targets[human.index, 0], grid), to_grid(human.loser, grid))
            out["loss"] = out["loss"] + terms.pop("loss")
            out.update(terms)
        # training metrics over every prompt set: channel k = the best predicted-IoU mask of prompt set k, at G's size
        preds = best_slot(logits, iou_pred) if grid == size else upsample(best_slot(low, iou_pred), size)
        return preds, targets.expand_as(preds), out


def loss_terms(output: Any) -> dict[str, float]:
    """Handler ``output_transform``: the loss and its terms from a (decollated) trainer output."""
    first = output[0] if isinstance(output, (list, tuple)) else output
    return {k: float(first[k]) for k in LOGGED_TERMS if k in first}
