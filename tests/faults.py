"""Fault injection for the training tests: components a test puts into a real training through config overrides."""

import torch

from bundle.preference import SAMPOLoss


class NaNLoss(SAMPOLoss):
    """SAMPOLoss whose total loss is NaN (the terms stay as computed): a diverging training, on demand."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out["loss"] = out["loss"] * torch.tensor(float("nan"))
        return out
