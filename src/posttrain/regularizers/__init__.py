"""Regularizers: one small protocol, one small class per technique, any number at once.

A regularizer implements only the hooks it needs (see `Regularizer`); `RegularizerSet`
calls them for every method, so adding one is a class here plus a yaml in `conf/reg/`.
"""

from posttrain.regularizers.base import Regularizer, RegularizerSet

__all__ = ["Regularizer", "RegularizerSet"]
