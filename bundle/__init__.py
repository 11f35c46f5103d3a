"""SAMPO: preference optimisation for promptable segmentation with Segment Anything, as a MONAI bundle."""

__version__ = "0.1.0"
