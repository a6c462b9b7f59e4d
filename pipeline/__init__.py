"""segcal: calibration of semantic segmentation models on Ray."""

__version__ = "0.1.0"
