"""posttrain: post-training improvement of neural networks on Lightning + Hydra."""

__version__ = "0.1.0"
