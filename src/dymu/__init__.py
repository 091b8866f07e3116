"""dymu: training-free Dynamic Merging and Virtual Unmerging (arXiv 2504.17040) for HF VLMs."""

__version__ = "0.1.0"
