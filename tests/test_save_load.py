"""Saving and loading RoSA adapters in PEFT's format: the mask travels with the file, an adapter saved before its
mask reloads as LoRA-only, the file holds only the compact CSR, and it is about the size of a LoRA file."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import logits_of, rosa_llama, sample_ids, set_random_masks, word_llama
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

import rosa
from rosa import AdapterFileError, RosaConfig
from rosa.sparse.delta import SUPPORT_BUFFERS, compact_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

LOADERS = {
    "peft": lambda base, path, **kw: PeftModel.from_pretrained(base, path, **kw),
    "rosa": lambda base, path, **kw: rosa.load_rosa_model(base, path, **kw),
}


def _adapter_state(model) -> dict[str, torch.Tensor]:
    """Every RoSA tensor (A, B, values and the five support buffers) of every layer, by name."""
    state = {}
    for name, layer in rosa.rosa_layers(model).items():
        for adapter in layer.rosa_values:
            state[f"{name}.values.{adapter}"] = layer.rosa_values[adapter].detach()
            if adapter in layer.rosa_A:
                state[f"{name}.A.{adapter}"] = layer.rosa_A[adapter].weight.detach()
                state[f"{name}.B.{adapter}"] = layer.rosa_B[adapter].weight.detach()
            for buffer in SUPPORT_BUFFERS:
                state[f"{name}.{buffer}.{adapter}"] = getattr(layer, buffer)[adapter]
    return state


def _assert_same_state(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for key, tensor in expected.items():
        assert actual[key].dtype == tensor.dtype, key
        assert torch.equal(actual[key], tensor), key


@pytest.fixture(scope="module")
def saved_with_mask(tmp_path_factory):
    model = rosa_llama()
    set_random_masks(model, fill=0.7)  # fewer nonzeros than capacity: the tail of the values is unused
    path = tmp_path_factory.mktemp("with_mask")
    model.save_pretrained(path)
    return path, _adapter_state(model), logits_of(model, sample_ids())


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_saved_after_the_mask_reloads_with_its_mask(saved_with_mask, loader):
    path, state, logits = saved_with_mask
    model = LOADERS[loader](word_llama(), path)
    _assert_same_state(_adapter_state(model), state)  # support (all five buffers) and values identical
    assert all(layer.nnz("default") > 0 for layer in rosa.rosa_layers(model).values())
    assert not any(p.requires_grad for p in model.parameters())  # inference mode by default
    assert torch.equal(logits_of(model, sample_ids()), logits)


def test_low_cpu_mem_usage_load(saved_with_mask):
    path, state, logits = saved_with_mask
    model = PeftModel.from_pretrained(word_llama(), path, low_cpu_mem_usage=True)
    assert not any(t.is_meta for t in (*model.parameters(), *model.buffers()))
    _assert_same_state(_adapter_state(model), state)
    assert torch.equal(logits_of(model, sample_ids()), logits)


def test_reload_as_trainable_and_keep_training(saved_with_mask):
    path, state, _ = saved_with_mask
    model = rosa.load_rosa_model(word_llama(), path, is_trainable=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, p in rosa_llama().named_parameters() if p.requires_grad}
    ids = sample_ids()
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1).step()
    after = _adapter_state(model)
    for key in state:
        changed = not torch.equal(after[key], state[key])
        assert changed == (".values." in key or ".A." in key or ".B." in key), key  # support stays fixed
    # only the active values moved: the unused tail past nnz has no gradient
    for name, layer in rosa.rosa_layers(model).items():
        nnz = layer.nnz("default")
        assert torch.equal(after[f"{name}.values.default"][nnz:], state[f"{name}.values.default"][nnz:])


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_saved_before_the_mask_reloads_as_lora_only(tmp_path, loader):
    model = rosa_llama()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in rosa.rosa_layers(model).values():
            weight = layer.rosa_B["default"].weight
            weight.copy_(torch.randn(weight.shape, generator=g) * 0.1)
    ids = sample_ids()
    logits = logits_of(model, ids)
    model.save_pretrained(tmp_path)

    loaded = LOADERS[loader](word_llama(), tmp_path, is_trainable=True)
    layers = rosa.rosa_layers(loaded)
    assert all(layer.nnz("default") == 0 for layer in layers.values())
    _assert_same_state(_adapter_state(loaded), _adapter_state(model))
    assert torch.equal(logits_of(loaded, ids), logits)
    # the mask is still to come: the full capacity is there and a support can be set after loading
    masks = set_random_masks(loaded, seed=9)
    assert all(layer.nnz("default") == int(masks[n].sum()) > 0 for n, layer in layers.items())
    assert not torch.equal(logits_of(loaded, ids), logits)


def test_file_holds_only_the_compact_support(saved_with_mask):
    path = saved_with_mask[0]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["peft_type"] == "ROSA" and config["task_type"] == "CAUSAL_LM"
    assert type(PeftConfig.from_pretrained(path)) is RosaConfig
    assert not any(p.name.endswith((".bin", ".pt", ".pth")) for p in path.iterdir())

    tensors = load_file(path / "adapter_model.safetensors")
    layers = rosa.rosa_layers(rosa_llama())
    expected = set()
    for name in layers:
        for suffix in ("rosa_A.weight", "rosa_B.weight", "rosa_values", "rosa_row_offsets", "rosa_col_idx"):
            expected.add(f"{name}.{suffix}")
    assert set(tensors) == expected  # no transposed support: it is rebuilt (and so cannot be forged) at load
    for key, tensor in tensors.items():
        if key.endswith("rosa_col_idx"):
            assert tensor.dtype == torch.int16
        elif key.endswith("rosa_row_offsets"):
            assert tensor.dtype == torch.int32
        else:
            assert tensor.dtype == torch.float32
    for name, layer in layers.items():
        assert tensors[f"{name}.rosa_values"].numel() == layer.capacity["default"]
        assert tensors[f"{name}.rosa_row_offsets"].numel() == layer.out_features + 1


def test_wide_layer_keeps_int32_column_indices(tmp_path):
    """Inputs wider than int16 can index: the column indices stay int32 on disk and reload exactly."""

    class Wide(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(40_000, 3, bias=False)

        def forward(self, x):
            return self.proj(x)

    def make():
        torch.manual_seed(0)
        return Wide()

    config = RosaConfig(r=1, lora_alpha=1, density=0.001, target_modules=["proj"])
    model = rosa.get_rosa_model(make(), config)
    layer = rosa.rosa_layers(model)["base_model.model.proj"]
    mask = torch.zeros(3, 40_000, dtype=torch.bool)
    mask[0, [5, 39_999]] = True
    mask[2, [0, 32_768, 33_000]] = True
    layer.set_support("default", rosa.sparse.support_from_mask(mask))
    with torch.no_grad():
        layer.rosa_values["default"].normal_(generator=torch.Generator().manual_seed(1))
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as f:
        assert f.get_tensor("base_model.model.proj.rosa_col_idx").dtype == torch.int32
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    assert torch.equal(
        rosa.rosa_layers(loaded)["base_model.model.proj"].support("default").to_dense_mask(), mask
    )
    x = torch.randn(2, 40_000, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_compact_support_narrows_only_what_fits():
    state = {
        "m.rosa_col_idx": torch.tensor([0, 32_767], dtype=torch.int32),
        "n.rosa_col_idx": torch.tensor([0, 32_768], dtype=torch.int32),
        "m.rosa_row_offsets": torch.tensor([0, 2], dtype=torch.int32),
        "m.rosa_t_perm": torch.tensor([0, 1]),
        "m.rosa_t_row_offsets": torch.tensor([0, 2], dtype=torch.int32),
        "m.rosa_t_col_idx": torch.tensor([0, 0], dtype=torch.int32),
        "m.rosa_values": torch.ones(2),
    }
    out = compact_state_dict(state)
    assert set(out) == {"m.rosa_col_idx", "n.rosa_col_idx", "m.rosa_row_offsets", "m.rosa_values"}
    assert out["m.rosa_col_idx"].dtype == torch.int16 and out["n.rosa_col_idx"].dtype == torch.int32
    assert out["m.rosa_col_idx"].tolist() == [0, 32_767]


def test_file_is_at_most_1_5x_a_lora_file_with_the_same_trainable_parameters(tmp_path):
    """The size target, on a model large enough that safetensors' per-tensor header does not dominate."""
    from transformers import LlamaConfig, LlamaForCausalLM

    def make():
        torch.manual_seed(0)
        return LlamaForCausalLM(
            LlamaConfig(
                vocab_size=64,
                hidden_size=256,
                intermediate_size=512,
                num_hidden_layers=1,
                num_attention_heads=4,
                num_key_value_heads=2,
                tie_word_embeddings=False,
            )
        )

    model = rosa.get_rosa_model(make(), RosaConfig(r=4, lora_alpha=8, density=0.006))
    set_random_masks(model)
    model.save_pretrained(tmp_path / "rosa")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    best = None
    for rank in range(1, 16):
        lora = get_peft_model(make(), LoraConfig(r=rank, target_modules="all-linear"))
        count = sum(p.numel() for p in lora.parameters() if p.requires_grad)
        if best is None or abs(count - trainable) < abs(best[1] - trainable):
            best = (lora, count)
    lora, count = best
    assert abs(count - trainable) / trainable < 0.2
    lora.save_pretrained(tmp_path / "lora")
    rosa_bytes = (tmp_path / "rosa" / "adapter_model.safetensors").stat().st_size
    lora_bytes = (tmp_path / "lora" / "adapter_model.safetensors").stat().st_size
    per_param = (rosa_bytes / trainable) / (lora_bytes / count)  # compare at exactly equal parameter counts
    assert per_param <= 1.5, (rosa_bytes, trainable, lora_bytes, count)


def test_ignore_mismatched_sizes_is_refused_not_silently_wrong(saved_with_mask):
    """PEFT's ignore_mismatched_sizes=True drops every tensor whose shape differs from the model's, which is the
    case for a support's column indices: the load must fail, not come back without its mask."""
    path = saved_with_mask[0]
    with pytest.raises(AdapterFileError, match=r"rosa_col_idx\.default: missing.*ignore_mismatched_sizes"):
        PeftModel.from_pretrained(word_llama(), path, ignore_mismatched_sizes=True)
