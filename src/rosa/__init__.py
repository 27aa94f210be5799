"""rosa: RoSA (Robust Adaptation) fine-tuning, PEFT-native."""

from .config import RosaConfig, RosaConfigError
from .layer import RosaLayer, RosaLinear

__version__ = "0.1.0"

__all__ = ["RosaConfig", "RosaConfigError", "RosaLayer", "RosaLinear", "__version__"]
