"""prunestudy: a reproducible study of neural-network pruning (COCO crops, seed CNN)."""

__version__ = "0.1.0"
