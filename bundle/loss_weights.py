"""Config values of the losses, checked where they enter: a weight is a finite number w >= 0 (w > 0 where it must
be positive, e.g. a DPO temperature beta), a switch is true / false. One home for SAMPO (bundle/preference.py), the
human pairs, paper 003's losses and pretraining."""

from __future__ import annotations

import math


def loss_weight(name: str, value, positive: bool = False) -> float:
    """``value`` as a float; ``ValueError`` naming ``name`` unless it is a finite number >= 0 (> 0 if ``positive``)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        hint = " (beta <= 0 makes the preference term constant or reversed)" if name == "beta" else ""
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}{hint}")
    return value


def switch(name: str, value) -> bool:
    """A switch from a config or the command line: a bool, or the strings true / false (any case)."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value
