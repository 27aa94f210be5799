"""``PeftType.ROSA`` against the installed PEFT: the enum member behaves like a declared one, the three PEFT
mappings point at rosa's classes, registering again is a no-op, and PEFT's generic loaders return a RosaConfig.

This file is the guard for ``rosa.peft_registration``, the only module touching PEFT internals: if a PEFT upgrade
changes how methods are registered, it fails here first.
"""

from __future__ import annotations

import copy
import json
import pickle

import peft
import pytest
from helpers import rosa_llama
from packaging.version import Version
from peft import PeftConfig
from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType

import rosa
from rosa import RosaConfig, RosaModel
from rosa.peft_registration import register

pytestmark = pytest.mark.usefixtures("one_thread")


def _registry_snapshot() -> tuple:
    return (
        dict(PEFT_TYPE_TO_CONFIG_MAPPING),
        dict(PEFT_TYPE_TO_TUNER_MAPPING),
        dict(PEFT_TYPE_TO_PREFIX_MAPPING),
        dict(PEFT_TYPE_TO_MIXED_MODEL_MAPPING),
        list(PeftType),
        dict(PeftType.__members__),
        dict(PeftType._value2member_map_),
    )


def test_rosa_is_a_real_peft_type_member():
    member = PeftType("ROSA")
    assert member is PeftType.ROSA is PeftType["ROSA"]
    assert isinstance(member, PeftType) and isinstance(member, str)
    assert member == "ROSA" and member.value == "ROSA" and member.name == "ROSA"
    assert member in list(PeftType) and list(PeftType).count(member) == 1
    assert {"ROSA": 1}[member] == 1 and {member: 1}["ROSA"] == 1  # hashes as its string value
    assert json.loads(json.dumps({"peft_type": member})) == {"peft_type": "ROSA"}
    assert pickle.loads(pickle.dumps(member)) is member
    assert copy.deepcopy(member) is member
    # the members PEFT declared are untouched
    assert PeftType("LORA") is PeftType.LORA and PeftType.LORA.value == "LORA"


def test_mappings_point_at_rosa():
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.ROSA] is RosaConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.ROSA] is RosaModel
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.ROSA] == "rosa_" == RosaModel.prefix
    assert PeftType.ROSA not in PEFT_TYPE_TO_MIXED_MODEL_MAPPING
    assert PEFT_TYPE_TO_CONFIG_MAPPING["ROSA"] is RosaConfig  # PEFT looks configs up by the JSON string
    assert RosaConfig().peft_type is PeftType.ROSA


def test_registering_again_is_a_no_op():
    before = _registry_snapshot()
    register()
    register()
    after = _registry_snapshot()
    assert after[:4] == before[:4]
    assert after[4] == before[4]
    assert after[5] == before[5] and after[6] == before[6]
    assert RosaConfig(r=2).peft_type is PeftType.ROSA  # constructing a config registers too: still a no-op
    assert _registry_snapshot()[4] == before[4]


def test_registering_over_another_method_is_refused(monkeypatch):
    class Impostor:
        pass

    monkeypatch.setitem(PEFT_TYPE_TO_TUNER_MAPPING, PeftType.ROSA, Impostor)
    with pytest.raises(RuntimeError, match="already registered"):
        register()


def test_installed_peft_provides_what_registration_uses():
    """The PEFT API surface rosa.peft_registration relies on (a PEFT upgrade that drops any of it breaks rosa)."""
    from peft.utils import register_peft_method

    assert callable(register_peft_method)
    assert (
        issubclass(PeftType, str)
        and hasattr(PeftType, "_member_map_")
        and hasattr(PeftType, "_value2member_map_")
    )
    assert Version(peft.__version__) >= Version("0.17")  # pyproject's floor


def test_peft_config_from_pretrained_returns_a_rosa_config(tmp_path):
    config = RosaConfig(
        task_type="CAUSAL_LM",
        r=8,
        lora_alpha=16,
        density=0.01,
        target_modules=["q_proj", "v_proj"],
        density_pattern={"v_proj": 0.02},
        mask_method="magnitude",
    )
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "ROSA"

    for loader in (PeftConfig.from_pretrained, RosaConfig.from_pretrained):
        loaded = loader(tmp_path)
        assert type(loaded) is RosaConfig
        assert loaded.peft_type is PeftType.ROSA
        assert (loaded.r, loaded.lora_alpha, loaded.density, loaded.mask_method) == (8, 16, 0.01, "magnitude")
        assert loaded.target_modules == {"q_proj", "v_proj"}
        assert loaded.density_pattern == {"v_proj": 0.02}
        assert loaded.density_for("model.layers.0.self_attn.v_proj") == 0.02

    assert type(peft.get_peft_config(saved)) is RosaConfig


def test_model_status_and_generic_peft_helpers():
    model = rosa_llama()
    status = model.get_model_status()
    assert status.peft_types == {"default": "ROSA"}
    assert status.available_adapters == ["default"]
    layer_status = model.get_layer_status()
    assert len(layer_status) == len(rosa.rosa_layers(model))
    assert all(s.module_type.startswith("rosa.") for s in layer_status)
    state = peft.get_peft_model_state_dict(model)
    assert state and all(".rosa_" in key for key in state)
