"""CT intensity: named HU windows -> [0, 1] with clipping, grey -> 3 channels.

``(hu - low) / (high - low)`` clipped to [0, 1]: :class:`CTWindowd` (MONAI ``ScaleIntensityRanged``) in the data
pipelines, :func:`apply_window` on arrays (inference); nothing else in the bundle windows CT.

| window      | HU range        | level / width | use                                            |
|-------------|-----------------|---------------|------------------------------------------------|
| synapse     | -125 .. 275     | 75 / 400      | TransUNet's Synapse preprocessing (default)    |
| abdomen     | -160 .. 240     | 40 / 400      | soft-tissue abdomen                            |
| liver       | -45 .. 105      | 30 / 150      | liver parenchyma and lesions                   |
| bone        | -500 .. 1300    | 400 / 1800    | bone                                           |
| lung        | -1350 .. 150    | -600 / 1500   | lung parenchyma                                |

Config use::

    - {_target_: bundle.transforms.ct.CTWindowd, keys: image, window: synapse}
    - {_target_: bundle.transforms.ct.GreyToRGBd, keys: image}
"""

from __future__ import annotations

import numpy as np
from monai.config import KeysCollection
from monai.transforms import RepeatChanneld, ScaleIntensityRanged

WINDOWS: dict[str, tuple[float, float]] = {
    "synapse": (-125.0, 275.0),
    "abdomen": (-160.0, 240.0),
    "liver": (-45.0, 105.0),
    "bone": (-500.0, 1300.0),
    "lung": (-1350.0, 150.0),
}


def window_range(window: str | tuple[float, float] | list[float]) -> tuple[float, float]:
    """A window name (``WINDOWS``) or an explicit (low, high) HU pair -> (low, high)."""
    if isinstance(window, str):
        if window not in WINDOWS:
            raise ValueError(f"unknown CT window {window!r}; known windows: {list(WINDOWS)} or a (low, high) HU pair")
        return WINDOWS[window]
    low, high = (float(v) for v in window)
    if not low < high:
        raise ValueError(f"CT window must have low < high, got ({low}, {high})")
    return low, high


def apply_window(hu: np.ndarray, window: str | tuple[float, float] | list[float]) -> np.ndarray:
    """HU array -> float32 in [0, 1]: ``window`` (a name or a (low, high) pair) mapped linearly, the rest clipped."""
    low, high = window_range(window)
    return np.clip((np.asarray(hu).astype(np.float32) - low) / (high - low), 0.0, 1.0)


class CTWindowd(ScaleIntensityRanged):
    """Map HU in ``window`` linearly to [0, 1], values outside clipped (a ScaleIntensityRanged)."""

    def __init__(self, keys: KeysCollection, window: str | tuple[float, float] = "synapse", allow_missing_keys=False):
        self.window = window_range(window)
        super().__init__(keys, *self.window, b_min=0.0, b_max=1.0, clip=True, allow_missing_keys=allow_missing_keys)


class GreyToRGBd(RepeatChanneld):
    """(1, H, W) grey -> (3, H, W) by repeating the channel, as SAM expects RGB input."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False):
        super().__init__(keys, repeats=3, allow_missing_keys=allow_missing_keys)
