"""rosa: RoSA (Robust Adaptation, arXiv 2401.04679) fine-tuning as a native PEFT method.

Importing rosa registers ``PeftType.ROSA`` with PEFT, as PEFT's own tuners register themselves when imported
(:mod:`rosa.peft_registration`), so ``peft.get_peft_model(model, RosaConfig(...))``,
``PeftModel.from_pretrained``, ``AutoPeftModelForCausalLM`` and transformers' PEFT integration all know RoSA
once ``import rosa`` has run. That import therefore costs PEFT's own import time (torch, transformers); the
``rosa`` command's ``--help`` is answered by :mod:`rosa_cli` without it.
"""

from __future__ import annotations

from .config import RosaConfig, RosaConfigError
from .layer import RosaLayer, RosaLinear, rosa_layers
from .model import RosaModel, get_rosa_model, load_rosa_model, sparse_parameter_count
from .peft_registration import register
from .serialization import AdapterFileError

__version__ = "0.1.0"

register()

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
