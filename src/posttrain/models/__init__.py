"""Models: backbones by name and the classifier wrapper with a replaceable head."""

from posttrain.models.backbones import ImageClassifier, build_classifier

__all__ = ["ImageClassifier", "build_classifier"]
