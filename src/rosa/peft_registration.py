"""Make ROSA a first-class PEFT method on the installed PEFT, without forking it.

PEFT's ``register_peft_method`` only accepts names already in its ``PeftType`` enum, and several places read
``peft_type.value`` (transformers' PEFT integration among them), so a plain string is not enough: a real member
is added to the enum. This is the only module in rosa that touches PEFT internals; ``tests/test_peft_registration.py``
checks it against the installed PEFT version.
"""

from __future__ import annotations

import enum

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType, register_peft_method

from .config import RosaConfig
from .model import RosaModel
from .serialization import PEFT_TYPE, PREFIX


def _add_str_enum_member(enum_cls: type[enum.Enum], name: str) -> enum.Enum:
    """Add ``name`` (value == name) to a ``(str, Enum)`` class, as if it had been declared there."""
    if name in enum_cls.__members__:
        return enum_cls[name]
    member = str.__new__(enum_cls, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = enum_cls
    member._sort_order_ = len(enum_cls._member_names_)
    type.__setattr__(enum_cls, name, member)  # EnumType.__setattr__ refuses member names
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[name] = member
    enum_cls._member_names_.append(name)
    if isinstance(getattr(enum_cls, "_hashable_values_", None), list):  # Python >= 3.13
        enum_cls._hashable_values_.append(name)
    if enum_cls(name) is not member or enum_cls[name] is not member:
        raise RuntimeError(
            f"could not add {name} to {enum_cls.__name__}: this Python's enum internals differ"
        )
    return member


def register() -> None:
    """Idempotent: add PeftType.ROSA and register RosaConfig / RosaModel with PEFT."""
    member = _add_str_enum_member(PeftType, PEFT_TYPE)
    registered = PEFT_TYPE_TO_TUNER_MAPPING.get(member)
    if registered is not None:
        if registered is not RosaModel:
            raise RuntimeError(f"PEFT type {PEFT_TYPE} is already registered by {registered!r}")
        return
    register_peft_method(
        name=PEFT_TYPE.lower(),
        config_cls=RosaConfig,
        model_cls=RosaModel,
        prefix=PREFIX,
        is_mixed_compatible=False,
    )
