"""Stop training before the optimiser step when the loss or a gradient is not finite."""

from __future__ import annotations

import torch
from ignite.engine import Engine
from monai.engines.utils import IterationEvents

from bundle.checkpoints import latest_checkpoint
from bundle.engines import LOGGED_TERMS


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
