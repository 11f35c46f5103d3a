"""The bundle's Ignite handlers, one per module (MONAI's handlers do the rest); configs name them
``bundle.handlers.<Name>``.

* :class:`TrainingState`: save the training state after every epoch (adapter-sized, :mod:`bundle.checkpoints`),
  resume from it, best metric and LR schedule included.
* :class:`RunSummary`: at the end, what was trained (or why nothing was) and where the checkpoints and run are.
* :class:`NonFiniteGuard`: stop before the optimiser step when the loss or a gradient is not finite.
* :class:`StartMessage`: say "Engine run starting at epoch E of M" instead of Ignite's "resuming from iteration 0".
* :class:`SaveSAMCheckpoint`: write the network's SAM weights in the official key layout (pretraining).
* :class:`ExportBundle`: export ``model.pt`` / ``model.ts`` at the end of training and log them to MLflow.
* :class:`RegisterBundle`: register that exported bundle in the MLflow model registry (``registered_model_name``).
* :class:`EvaluationReport`: one row per evaluated item, then CSV, summary JSON, sensitivity grid, MLflow run.

They report through :mod:`logging` (``configs/logging.conf`` sends INFO to stdout).
"""

from .evaluation_report import EvaluationReport
from .export_bundle import ExportBundle
from .non_finite_guard import NonFiniteGuard
from .register_bundle import RegisterBundle
from .run_summary import RunSummary
from .save_sam_checkpoint import SaveSAMCheckpoint
from .start_message import StartMessage
from .training_state import TrainingState

__all__ = ["EvaluationReport", "ExportBundle", "NonFiniteGuard", "RegisterBundle", "RunSummary", "SaveSAMCheckpoint",
           "StartMessage", "TrainingState"]
