"""SAMPO: preference optimisation for promptable segmentation with Segment Anything, as a MONAI bundle."""

import os

# The bundle never reaches the network on its own: MLflow 3 would otherwise send usage telemetry from every run.
# Set MLFLOW_DISABLE_TELEMETRY=false explicitly to opt back in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

__version__ = "0.1.0"

# an uncaught error ends with the bundle's own message, not with monai.bundle's "Failed to evaluate ..." wrapper
from bundle.errors import install_excepthook  # noqa: E402

install_excepthook()
