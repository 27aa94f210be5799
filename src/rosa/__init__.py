"""rosa: RoSA (Robust Adaptation, arXiv 2401.04679) fine-tuning as a native PEFT method.

Importing rosa registers ``PeftType.ROSA`` with PEFT, so ``peft.get_peft_model(model, RosaConfig(...))`` and
``PeftModel.from_pretrained`` work like for any PEFT method.
"""

from .config import RosaConfig, RosaConfigError
from .layer import RosaLayer, RosaLinear
from .model import RosaModel, get_rosa_model, load_rosa_model, rosa_layers, sparse_parameter_count
from .peft_registration import register as _register
from .serialization import AdapterFileError

_register()

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "RosaConfig",
    "RosaConfigError",
    "RosaLayer",
    "RosaLinear",
    "RosaModel",
    "__version__",
    "get_rosa_model",
    "load_rosa_model",
    "rosa_layers",
    "sparse_parameter_count",
]
