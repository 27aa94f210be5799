"""rosa: RoSA (Robust Adaptation, arXiv 2401.04679) fine-tuning as a native PEFT method.

Importing rosa registers ``PeftType.ROSA`` with PEFT, so ``peft.get_peft_model(model, RosaConfig(...))`` and
``PeftModel.from_pretrained`` work like for any PEFT method.

The import itself is light (no torch, no PEFT), so that ``rosa --help`` answers at once: the public names load
on first use, and the registration happens as soon as PEFT is imported (at once when it already is), whoever
imports it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import RosaConfig, RosaConfigError
    from .layer import RosaLayer, RosaLinear
    from .model import RosaModel, get_rosa_model, load_rosa_model, rosa_layers, sparse_parameter_count
    from .serialization import AdapterFileError

__version__ = "0.1.0"

_PUBLIC = {
    "AdapterFileError": "serialization",
    "RosaConfig": "config",
    "RosaConfigError": "config",
    "RosaLayer": "layer",
    "RosaLinear": "layer",
    "RosaModel": "model",
    "get_rosa_model": "model",
    "load_rosa_model": "model",
    "rosa_layers": "model",
    "sparse_parameter_count": "model",
}

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


def __getattr__(name: str) -> Any:
    """PEP 562: load a public name's module on first use (that import registers with PEFT, see below).

    Submodules load on first use too (``rosa.masks.collect_mask`` after a bare ``import rosa``).
    """
    module = _PUBLIC.get(name)
    if module is not None:
        value = getattr(importlib.import_module(f".{module}", __name__), name)
        globals()[name] = value
        return value
    if name.isidentifier() and not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}"):
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})


class _RegisterWithPeft(importlib.abc.MetaPathFinder):
    """Registers ``PeftType.ROSA`` once PEFT is imported and no rosa or PEFT module is still half-imported.

    PEFT finds a saved adapter's config class by its ``peft_type``, so ``import rosa; PeftModel.from_pretrained``
    needs the registration without rosa importing PEFT itself. This finder only watches the imports of ``peft``
    and ``rosa.*``: it lets the other finders find them and counts the loads in progress, so the registration
    (which imports rosa.config and rosa.model) never runs inside one of them.
    """

    def __init__(self) -> None:
        self.loading = 0
        self.done = False

    def find_spec(
        self, fullname: str, path: Any = None, target: Any = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "peft" and not fullname.startswith(f"{__name__}."):
            return None
        spec = _find_elsewhere(self, fullname, path, target)
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            # one loader object per spec: wrapping its exec_module touches no other import
            spec.loader.exec_module = functools.partial(self._exec, spec.loader.exec_module)
        return spec

    def _exec(self, exec_module: Any, module: Any) -> None:
        self.loading += 1
        try:
            exec_module(module)
        finally:
            self.loading -= 1
        if self.loading == 0 and "peft" in sys.modules:
            try:
                self.register()
            except Exception as e:  # raising here would unload the module just imported; RosaConfig() retries
                warnings.warn(f"rosa could not register with PEFT: {e!r}", stacklevel=2)

    def register(self) -> None:
        """Register now (once); the finder's work is then done."""
        if self.done:
            return
        self.done = True
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)
        from .peft_registration import register

        register()


def _find_elsewhere(me: Any, fullname: str, path: Any, target: Any) -> importlib.machinery.ModuleSpec | None:
    """The spec the rest of ``sys.meta_path`` finds for ``fullname``."""
    for finder in list(sys.meta_path):
        if finder is not me and hasattr(finder, "find_spec"):
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                return spec
    return None


_registrar = _RegisterWithPeft()
if "peft" in sys.modules:  # PEFT came first: nothing left to wait for
    _registrar.register()
else:
    sys.meta_path.insert(0, _registrar)
