"""Every supported decoder architecture, as a tiny random model with ``target_modules="all-linear"``: RoSA wraps
every linear layer (GPT-2's Conv1D included, detected by the layer itself), matches the dense reference, trains
a step and round-trips through save/load with identical logits."""

from __future__ import annotations

import pytest
import torch
import transformers
from helpers import assert_close, linear_names, logits_of, reference_model, sample_ids, set_random_masks
from peft import PeftModel
from transformers.pytorch_utils import Conv1D

import rosa
from rosa import RosaConfig

pytestmark = pytest.mark.usefixtures("one_thread")

HIDDEN, FFN, LAYERS, HEADS, VOCAB = 32, 64, 2, 4, 64

ARCHITECTURES = {
    "llama": lambda: transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "mistral": lambda: transformers.MistralConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    ),
    "gpt2": lambda: transformers.GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
    ),
    "opt": lambda: transformers.OPTConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        ffn_dim=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        word_embed_proj_dim=HIDDEN,
        max_position_embeddings=64,
    ),
    "phi": lambda: transformers.PhiConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        max_position_embeddings=64,
    ),
}


def _make_base(arch: str):
    def make():
        torch.manual_seed(0)
        return transformers.AutoModelForCausalLM.from_config(ARCHITECTURES[arch]()).eval()

    return make


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_trains_and_round_trips(arch, tmp_path):
    make = _make_base(arch)
    base = make()
    expected = {"base_model.model." + n for n in linear_names(base)}
    conv1d = {"base_model.model." + n for n, m in base.named_modules() if isinstance(m, Conv1D)}
    model = rosa.get_rosa_model(base, RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05))
    layers = rosa.rosa_layers(model)
    assert set(layers) == expected and len(expected) >= 4 * LAYERS
    assert {
        n for n, layer in layers.items() if layer.fan_in_fan_out
    } == conv1d  # GPT-2 only, detected per layer
    assert (arch == "gpt2") == bool(conv1d)

    masks = set_random_masks(model)
    ids = sample_ids()
    assert_close(logits_of(model, ids), logits_of(reference_model(model, make, "default", masks), ids), arch)

    # one training step moves every trainable tensor, the support stays fixed
    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    supports = {n: layer.rosa_col_idx["default"].clone() for n, layer in layers.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    loss = model(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    assert all(torch.equal(layer.rosa_col_idx["default"], supports[n]) for n, layer in layers.items())

    model.eval()
    logits = logits_of(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make(), tmp_path)
    assert torch.equal(logits_of(loaded, ids), logits)
    assert_close(logits_of(loaded.merge_and_unload(), ids), logits, f"{arch} merged")


def test_4bit_llama_trains_and_round_trips(tmp_path):
    """QRoSA: the base as bitsandbytes NF4 (double quantization, the real CPU backend), fp32 adapters. Widths are
    >= 64: bitsandbytes' CPU inference path fails on narrower inputs."""
    pytest.importorskip("bitsandbytes")
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "base")
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )

    def make():
        return transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=quantization, device_map="cpu"
        )

    base = prepare_model_for_kbit_training(make(), use_gradient_checkpointing=False)
    model = rosa.get_rosa_model(base, RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.01))
    layers = rosa.rosa_layers(model)
    assert len(layers) == 7 and all(
        type(layer.base_layer).__name__ == "Linear4bit" for layer in layers.values()
    )
    set_random_masks(model)

    model.train()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    ids = sample_ids()
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert all(not torch.equal(p, before[n]) for n, p in trainable.items())
    assert all(p.dtype == torch.float32 for p in trainable.values())

    model.eval()
    logits = logits_of(model, ids)
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make(), tmp_path / "adapter")
    assert torch.equal(logits_of(loaded, ids), logits)
