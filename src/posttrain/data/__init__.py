"""Data: dataset sources and the image-classification DataModule."""

from posttrain.data.datamodule import ImageClassificationDataModule

__all__ = ["ImageClassificationDataModule"]
