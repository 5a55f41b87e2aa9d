"""mango: MANGO, Muon, LAMB, LaProp and NovoGrad from one fused optimizer engine."""

from . import config, presets, reference
from .optimizer import Mango
from .roles import describe, param_groups

__all__ = ["Mango", "param_groups", "describe", "presets", "reference", "config"]
__version__ = "0.1.0"
