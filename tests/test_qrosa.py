"""QRoSA: RoSA on a bitsandbytes NF4 base (double quantization, bf16 compute), with the real bitsandbytes CPU
backend. The tiny models are real transformers Llamas saved to disk and reloaded with a ``BitsAndBytesConfig``,
exactly as ``rosa.app.train`` loads a 4-bit model. Widths are >= 64: bitsandbytes' CPU inference path fails on
narrower inputs.

Tolerances (``max|err| / max|ref|``; measured values from the 2-core development machine):

- the adapter's own output (LoRA + sparse) and the gradients of A, B and the sparse values never pass through
  the 4-bit matmul, so they match the float64 reference to fp32 accuracy (measured <= 3e-7; asserted 1e-5);
- the layer output and the input gradient go through bitsandbytes' bf16 compute: x, the weight (dequantized
  to bf16) and, for dx, the upstream gradient are rounded to bf16 (unit roundoff 2^-9 = 2e-3), the matmul
  output once more (measured 3.3e-3 for y, 2.9e-3 for dx; asserted 2e-2);
- merged logits against the unmerged 4-bit model: an fp32 merge against the 4-bit model computing in fp32 is
  exact up to summation order (measured 7e-7; asserted 1e-4). A bf16 merge against the 4-bit model computing in
  bf16 carries the bf16 rounding of weights and activations through the network (measured 8.6e-3; asserted
  3e-2, and under a fifth of NF4's own error, measured as the same adapter on the unquantized base against the
  4-bit model: 0.20). Requantizing the merge to NF4 adds about one more NF4 rounding (weights: 10% relative
  error; logits: measured 0.24, asserted under twice NF4's own error).
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import transformers
from torch import nn

bnb = pytest.importorskip("bitsandbytes")

from peft import PeftModel, prepare_model_for_kbit_training  # noqa: E402
from tiny_models import tiny_tokenizer  # noqa: E402
from transformers import BitsAndBytesConfig  # noqa: E402

import rosa  # noqa: E402
from rosa import RosaConfig  # noqa: E402
from rosa.app.loading import load_model_and_tokenizer  # noqa: E402
from rosa.app.merge import merge_adapter_to_disk  # noqa: E402
from rosa.app.run_config import ModelSection  # noqa: E402
from rosa.mask import mask_layers  # noqa: E402
from rosa.masks import collect_mask, layer_budget  # noqa: E402
from rosa.merge import dequantized_weight, merge_to_dense  # noqa: E402
from rosa.scheduler import JOINT, RosaScheduler  # noqa: E402
from rosa.sparse import ops, support_from_flat_index  # noqa: E402

# vocab 320 keeps the embedding and head shapes (320, 128) apart from every adapted (out, in) shape.
VOCAB, HIDDEN, FFN = 320, 128, 256
ADAPTED_SHAPES = {(128, 128), (64, 128), (256, 128), (128, 256)}
TIGHT = 1e-5  # fp32 paths (see the module docstring)
BF16 = 2e-2  # through bitsandbytes' bf16 compute


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """A tiny random fp32 Llama (2 layers) and a tokenizer, saved like any local checkpoint."""
    path = tmp_path_factory.mktemp("qrosa") / "base"
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=FFN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(path)
    tiny_tokenizer(VOCAB).save_pretrained(path)
    return path


def load_4bit(path, compute_dtype=torch.bfloat16, prepare: bool = False, checkpointing: bool = False):
    quantization = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=quantization, device_map="cpu"
    )
    if prepare:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    return model


def unquantized(path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, device_map="cpu")


def rosa_config(**overrides) -> RosaConfig:
    kwargs = {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "density": 0.05, **overrides}
    return RosaConfig(**kwargs)


def set_random_masks(model, seed: int = 0, value_std: float = 0.02) -> None:
    """A random support at each layer's budget, with random values (as if trained)."""
    generator = torch.Generator().manual_seed(seed)
    for layer in rosa.rosa_layers(model).values():
        shape = (layer.out_features, layer.in_features)
        flat = torch.randperm(shape[0] * shape[1], generator=generator)[: layer.capacity["default"]]
        layer.set_support("default", support_from_flat_index(flat.sort().values, shape))
        with torch.no_grad():
            layer.rosa_values["default"].normal_(0.0, value_std, generator=generator)


def randomize_lora(model, seed: int = 0) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in rosa.rosa_layers(model).values():
            layer.rosa_B["default"].weight.normal_(0.0, 0.05, generator=generator)


def sample_ids(batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(4, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits_of(model, ids) -> torch.Tensor:
    model.eval()
    return model(input_ids=ids).logits.float()


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    got, ref = got.detach(), ref.detach()
    return float((got.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30))


def packed_bytes(model) -> dict[str, torch.Tensor]:
    return {n: m.weight.data.clone() for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def assert_bytes_unchanged(model, before: dict[str, torch.Tensor]) -> None:
    after = packed_bytes(model)
    assert after.keys() == before.keys()
    for name, data in after.items():
        assert data.dtype == torch.uint8 and torch.equal(data, before[name]), name


# --- one layer against float64 ----------------------------------------------------------------------------


def hand_built_linear4bit(in_features: int, out_features: int) -> nn.Module:
    """A bias-carrying Linear4bit built the bitsandbytes way (quantized on .to(device))."""
    generator = torch.Generator().manual_seed(3)
    layer = bnb.nn.Linear4bit(
        in_features,
        out_features,
        bias=True,
        compute_dtype=torch.bfloat16,
        compress_statistics=True,
        quant_type="nf4",
    )
    weight = torch.randn(out_features, in_features, generator=generator) * 0.05
    layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True, quant_type="nf4")
    layer.bias = nn.Parameter(torch.randn(out_features, generator=generator) * 0.1, requires_grad=False)
    return layer.to("cpu")


@pytest.mark.parametrize("which", ["model_down_proj", "hand_built_with_bias"])
def test_layer_matches_float64_reference(base_dir, which):
    if which == "model_down_proj":
        base = load_4bit(base_dir).model.layers[0].mlp.down_proj  # (128, 256), no bias
    else:
        base = hand_built_linear4bit(192, 160)
    assert isinstance(base, bnb.nn.Linear4bit) and base.weight.dtype == torch.uint8
    assert base.weight.quant_state.nested  # double quantization
    layer = rosa.RosaLinear(base, "default", r=4, lora_alpha=8, density=0.05, init_lora_weights=False)
    out_f, in_f = layer.out_features, layer.in_features
    generator = torch.Generator().manual_seed(1)
    flat = torch.randperm(out_f * in_f, generator=generator)[: layer.capacity["default"]].sort().values
    layer.set_support("default", support_from_flat_index(flat, (out_f, in_f)))
    with torch.no_grad():
        layer.rosa_values["default"].normal_(0.0, 0.05, generator=generator)
    packed = base.weight.data.clone()

    x = torch.randn(2, 24, in_f, generator=generator, requires_grad=True)
    grad_out = torch.randn(2, 24, out_f, generator=generator)
    layer.train()
    y = layer(x)
    y.backward(grad_out)
    with torch.no_grad():
        adapter_out = y - base(x)

    # float64 reference from the dequantized weight
    w = dequantized_weight(base).double()
    a = layer.rosa_A["default"].weight.detach().double().requires_grad_()
    b = layer.rosa_B["default"].weight.detach().double().requires_grad_()
    values = layer.rosa_values["default"].detach().double().requires_grad_()
    x64 = x.detach().double().requires_grad_()
    dense_s = torch.zeros(out_f * in_f, dtype=torch.float64).index_put((flat,), values).view(out_f, in_f)
    adapter_ref = layer.scaling["default"] * (x64 @ a.t()) @ b.t() + x64 @ dense_s.t()
    y_ref = x64 @ w.t() + adapter_ref
    if base.bias is not None:
        y_ref = y_ref + base.bias.double()
    y_ref.backward(grad_out.double())

    assert y.dtype == torch.float32
    assert rel_err(adapter_out, adapter_ref.detach()) < TIGHT
    assert rel_err(layer.rosa_A["default"].weight.grad, a.grad) < TIGHT
    assert rel_err(layer.rosa_B["default"].weight.grad, b.grad) < TIGHT
    assert rel_err(layer.rosa_values["default"].grad, values.grad) < TIGHT
    assert rel_err(y, y_ref.detach()) < BF16
    assert rel_err(x.grad, x64.grad) < BF16
    # the 4-bit weight is untouched and got no gradient
    assert torch.equal(base.weight.data, packed) and base.weight.grad is None


def graph_tensors(root) -> list[torch.Tensor]:
    """Every tensor an autograd graph keeps: the saved tensors of its C++ nodes (``_saved_*``) and whatever
    Python autograd Functions stored on their ctx (bitsandbytes keeps its weight in ``ctx.tensors``)."""
    seen, stack, found = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for name in dir(node):
            if not (name.startswith("_saved_") or name in ("tensors", "saved_tensors")):
                continue
            try:
                value = getattr(node, name)
            except RuntimeError:
                continue
            values = value if isinstance(value, (tuple, list)) else (value,)
            found += [v for v in values if isinstance(v, torch.Tensor)]
        stack += [child for child, _ in node.next_functions]
    return found


# --- no dense copy, no fold -------------------------------------------------------------------------------


def test_no_dense_weight_is_kept_and_fold_is_never_used(base_dir, monkeypatch):
    model = rosa.get_rosa_model(
        load_4bit(base_dir, prepare=True), rosa_config(sparse_strategy="fold", init_lora_weights=False)
    )
    set_random_masks(model)
    layers = rosa.rosa_layers(model)
    assert len(layers) == 14
    tokens = 32
    for layer in layers.values():
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
        assert not layer._can_fold()
        assert layer._fold_adapter(tokens, torch.device("cpu")) is None  # "fold" requested, refused

    def forbidden(*args, **kwargs):
        raise AssertionError("the fold strategy ran on a 4-bit base")

    monkeypatch.setattr(ops, "folded_linear", forbidden)
    monkeypatch.setattr(ops, "fold", forbidden)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    before = packed_bytes(model)
    dense_shapes = ADAPTED_SHAPES | {(i, o) for o, i in ADAPTED_SHAPES}

    def dense_weight_like(t: torch.Tensor) -> bool:
        return t.is_floating_point() and t.dim() == 2 and tuple(t.shape) in dense_shapes

    def live_dense_tensors() -> set[int]:
        return {id(o) for o in gc.get_objects() if isinstance(o, torch.Tensor) and dense_weight_like(o)}

    model.train()
    ids = sample_ids(seed=1)
    for _ in range(2):
        gc.collect()
        existing = live_dense_tensors()
        loss = model(input_ids=ids, labels=ids).loss
        # what the step's autograd graph holds: activations, and bitsandbytes' packed uint8 weights (kept by
        # its MatMul4Bit for the input gradient), never a dense weight
        held = graph_tensors(loss.grad_fn)
        assert any(t.dtype == torch.uint8 and t.numel() == 128 * 128 // 2 for t in held)
        assert not [tuple(t.shape) for t in held if dense_weight_like(t)]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        del loss
        gc.collect()
        # nothing dense of a weight's shape survives the step, anywhere in Python
        assert not (live_dense_tensors() - existing)
    # nor in the modules: the base holds its packed uint8 weight and quantization statistics only
    for layer in layers.values():
        tensors = [*layer.parameters(), *layer.buffers()]
        tensors += [
            v for v in vars(layer.get_base_layer().weight.quant_state).values() if isinstance(v, torch.Tensor)
        ]
        assert not [t for t in tensors if dense_weight_like(t)]
    assert_bytes_unchanged(model, before)
    assert all(layer.rosa_values["default"].grad is None for layer in layers.values())  # set_to_none


# --- bitsandbytes' CPU repacking ---------------------------------------------------------------------------


def test_evaluation_keeps_the_training_layout(base_dir):
    """bitsandbytes (CPU, AVX512-BF16) repacks a Linear4bit for inference on its first eval-mode no-grad forward;
    the repacked layer then drops the input gradient in training and dequantizes to garbage. RoSA layers keep the
    training layout: gradients after an evaluation equal those before, and the weight bytes never change."""
    model = rosa.get_rosa_model(load_4bit(base_dir, prepare=True), rosa_config(init_lora_weights=False))
    set_random_masks(model)
    ids = sample_ids(seed=2)
    before = packed_bytes(model)

    def grads():
        model.train()
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    first = grads()
    logits = logits_of(model, ids)
    assert torch.equal(logits_of(model, ids), logits)
    second = grads()
    assert first.keys() == second.keys() and len(first) == 14 * 3
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert_bytes_unchanged(model, before)
    for layer in rosa.rosa_layers(model).values():
        assert not getattr(layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", False)


def test_wrapping_an_already_repacked_model_restores_gradients(base_dir):
    """A model evaluated before RoSA wraps it: its layers are put back into the training layout, and the input
    gradient flows through the base again (B = 0, no mask: the gradient is the base model's own)."""
    fresh = rosa.get_rosa_model(load_4bit(base_dir, prepare=True), rosa_config())
    evaluated = load_4bit(base_dir, prepare=True)
    ids = sample_ids(seed=3)
    logits_of(evaluated, ids)  # repacks every Linear4bit on an AVX512-BF16 CPU
    evaluated = rosa.get_rosa_model(evaluated, rosa_config())
    for layer in rosa.rosa_layers(evaluated).values():
        assert not getattr(layer.get_base_layer().weight.quant_state, "packing_format_for_cpu", False)

    def embedding_grad(model):
        model.train()
        out = {}
        model.get_input_embeddings().register_forward_hook(
            lambda m, i, o: out.setdefault("e", o.detach().requires_grad_())
        )
        loss = model(input_ids=ids, labels=ids).loss
        return torch.autograd.grad(loss, out["e"])[0]

    # un-repacking re-quantizes the bf16-rounded absmax: nearly, not exactly, the original statistics
    assert rel_err(embedding_grad(evaluated), embedding_grad(fresh)) < BF16


def test_merge_dequantizes_layers_bitsandbytes_repacked(base_dir):
    """Only q/v adapted: the other Linear4bit layers get repacked by an evaluation, and the merge must read them in
    their new layout (the bf16 absmax they now compute with)."""
    model = rosa.get_rosa_model(
        load_4bit(base_dir), rosa_config(target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    set_random_masks(model)
    ids = sample_ids(seed=4)
    logits = logits_of(model, ids)
    repacked = [
        n
        for n, m in model.named_modules()
        if getattr(getattr(m, "weight", None), "quant_state", None) is not None
        and getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]
    if not repacked:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes does not repack")
    merged = merge_to_dense(model, torch.float32)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    assert rel_err(logits_of(merged, ids), logits) < BF16  # the repacked 4-bit forward computes in bf16


# --- mask collection ---------------------------------------------------------------------------------------


def test_mask_collection_on_a_4bit_model(base_dir):
    model = rosa.get_rosa_model(load_4bit(base_dir, prepare=True), rosa_config(init_lora_weights=False))
    layers = mask_layers(model)  # by the names masks use
    before = packed_bytes(model)
    batches = [{"input_ids": sample_ids(seed=s), "labels": sample_ids(seed=s)} for s in range(2)]

    # brute force: G_i = dY_i^T X_i per example from the layer outputs' gradients, fisher = mean of G_i^2
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    handles = [
        layer.register_forward_hook(lambda m, i, o, name=name: calls.append((name, i[0].detach(), o)))
        for name, layer in layers.items()
    ]
    fisher = dict.fromkeys(layers, 0.0)
    model.train()
    for batch in batches:
        calls.clear()
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, [out for _, _, out in calls])
        for (name, x, _), dy in zip(calls, grads):
            g = torch.einsum("bto,bti->boi", dy.double(), x.double())
            fisher[name] = fisher[name] + g.square().sum(0) / (len(batches) * len(g))
    for handle in handles:
        handle.remove()
    calls.clear()

    supports = collect_mask(model, batches, fisher_granularity="example")  # as the brute force above
    for name, layer in layers.items():
        budget = layer_budget(layer, "default")
        assert layer.nnz("default") == budget == supports[name].nnz > 0
        expected = set(torch.topk(fisher[name].flatten(), budget).indices.tolist())
        got = set(supports[name].flat_index().tolist())
        assert len(got & expected) >= budget - 2, name  # fp32 vs float64 accumulation: a near-tie swap or two
    assert all(p.grad is None for p in model.parameters())  # statistics need no weight (or any) gradient
    assert_bytes_unchanged(model, before)


# --- the whole schedule -------------------------------------------------------------------------------------


def test_schedule_trains_a_4bit_model(base_dir):
    """Loaded as ``rosa train model.load_in_4bit=true`` loads it (NF4, bf16 compute, then PEFT's
    prepare_model_for_kbit_training: fp32 norms and embeddings, input gradients, non-reentrant gradient
    checkpointing), then warm-up -> fisher mask collection -> joint training with a plain loop."""
    section = ModelSection(name=str(base_dir), load_in_4bit=True, gradient_checkpointing=True)
    base, _ = load_model_and_tokenizer(section)
    assert base.is_loaded_in_4bit and base.is_gradient_checkpointing
    assert base.model.layers[0].mlp.up_proj.compute_dtype == torch.bfloat16
    assert {p.dtype for n, p in base.named_parameters() if "norm" in n} == {torch.float32}
    config = rosa_config(warmup_steps=4, mask_steps=2)  # restart_after_mask: the paper's best recipe
    model = rosa.get_rosa_model(base, config)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("rosa_" in n and p.dtype == torch.float32 for n, p in trainable.items())
    before = packed_bytes(model)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2)
    schedule = RosaScheduler(model, config)
    batches = [sample_ids(batch=4, seq=16, seed=10 + s) for s in range(2)]
    losses = []
    model.train()
    for step in range(14):
        ids = batches[step % 2]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step(optimizer)
        losses.append(loss.item())
    events = {e["event"]: e["optimizer_step"] for e in schedule.events}
    assert schedule.phase == JOINT and events["collect_start"] == 4 and events["mask_fixed"] == 6
    layers = rosa.rosa_layers(model)
    assert all(layer.nnz("default") == layer_budget(layer, "default") for layer in layers.values())
    assert all(layer.rosa_values["default"].abs().sum() > 0 for layer in layers.values())  # trained jointly
    # same batch (odd steps): warm-up lowers the loss; the restart (step 7) puts A, B back to their initial
    # values, and joint training lowers it again, below where warm-up got
    assert losses[3] < losses[1]
    assert losses[13] < losses[7] and losses[13] < losses[3]
    assert_bytes_unchanged(model, before)


# --- save / load ---------------------------------------------------------------------------------------------


def test_save_load_round_trip_onto_a_fresh_4bit_base(base_dir, tmp_path):
    model = rosa.get_rosa_model(load_4bit(base_dir, prepare=True), rosa_config(init_lora_weights=False))
    set_random_masks(model)
    ids = sample_ids(seed=5)
    logits = logits_of(model, ids)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert saved and all("rosa_" in key for key in saved)  # the adapter only: no 4-bit base weight
    loaded = PeftModel.from_pretrained(load_4bit(base_dir, prepare=True), tmp_path)
    assert torch.equal(logits_of(loaded, ids), logits)
    trainable = rosa.load_rosa_model(load_4bit(base_dir, prepare=True), tmp_path, is_trainable=True)
    assert torch.equal(logits_of(trainable, ids), logits)
    trainable.train()
    trainable(input_ids=ids, labels=ids).loss.backward()
    assert all(
        layer.rosa_values["default"].grad is not None for layer in rosa.rosa_layers(trainable).values()
    )


# --- merging --------------------------------------------------------------------------------------------------


def test_peft_merge_and_unload_on_a_4bit_base_warns_with_the_measured_error(base_dir):
    """PEFT's own merge_and_unload keeps the model 4-bit, so it must requantize: it says so, with the error."""
    model = rosa.get_rosa_model(load_4bit(base_dir), rosa_config(init_lora_weights=False))
    set_random_masks(model)
    with pytest.warns(
        UserWarning, match=r"requantizes the merged weight: measured relative weight error ~0\.\d"
    ):
        merged = model.merge_and_unload()
    assert isinstance(merged.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)


LOAD_WITHOUT_ROSA = """
import json, sys, torch
from transformers import AutoModelForCausalLM
ids = torch.tensor(json.loads(sys.argv[1]))
result = {}
for path in sys.argv[2:]:
    model = AutoModelForCausalLM.from_pretrained(path, device_map="cpu")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
    layer = type(model.model.layers[0].self_attn.q_proj).__name__
    result[path] = {"logits": logits.tolist(), "dtype": str(model.dtype), "q_proj": layer}
assert "rosa" not in sys.modules
print(json.dumps(result))
"""


def test_merge_saves_checkpoints_transformers_loads_without_rosa(base_dir, tmp_path):
    # an adapter as training leaves it: a mask, trained values and LoRA
    model = rosa.get_rosa_model(load_4bit(base_dir, prepare=True), rosa_config(init_lora_weights=False))
    set_random_masks(model, value_std=0.05)
    randomize_lora(model)
    model.save_pretrained(tmp_path / "adapter")
    ids = sample_ids(seed=6)

    # fp32 merge against the 4-bit model computing in fp32: only the merge differs
    fp32_model = rosa.load_rosa_model(load_4bit(base_dir, compute_dtype=torch.float32), tmp_path / "adapter")
    fp32_ref = logits_of(fp32_model, ids)
    merge_to_dense(fp32_model, torch.float32).save_pretrained(tmp_path / "merged_fp32")

    # bf16 merge (and NF4 requantization) through `rosa merge`'s path, against the 4-bit model as it loads it
    section = ModelSection(name=str(base_dir), load_in_4bit=True)
    bf16_ref = logits_of(rosa.load_rosa_model(load_4bit(base_dir), tmp_path / "adapter"), ids)
    merge_adapter_to_disk(section, tmp_path / "adapter", tmp_path / "merged_bf16", dtype="bfloat16")
    with pytest.warns(
        UserWarning, match=r"requantizing .* NF4 .* relative weight error mean [0-9.]+"
    ) as record:
        merge_adapter_to_disk(
            section, tmp_path / "adapter", tmp_path / "merged_nf4", dtype="bfloat16", requantize=True
        )
    said = [str(w.message) for w in record if "requantizing" in str(w.message)]
    assert len(said) == 1  # once, not once per layer or per call
    message = said[0]
    weight_error = float(message.split("relative weight error mean ")[1].split(",")[0])
    assert 0.01 < weight_error < 0.2  # NF4 on Gaussian-like weights: ~10%
    assert "fraction of the adapter's own weight change" in message
    nf4_config = json.loads((tmp_path / "merged_nf4" / "config.json").read_text())["quantization_config"]
    assert nf4_config["bnb_4bit_quant_type"] == "nf4" and nf4_config["bnb_4bit_use_double_quant"]
    for name in ("merged_fp32", "merged_bf16"):
        assert "quantization_config" not in json.loads((tmp_path / name / "config.json").read_text())

    paths = [str(tmp_path / name) for name in ("merged_fp32", "merged_bf16", "merged_nf4")]
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(LOAD_WITHOUT_ROSA), json.dumps(ids.tolist()), *paths],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    fp32, bf16, nf4 = (result[p] for p in paths)
    assert fp32["dtype"] == "torch.float32" and fp32["q_proj"] == "Linear"
    assert bf16["dtype"] == "torch.bfloat16" and bf16["q_proj"] == "Linear"
    assert nf4["q_proj"] == "Linear4bit"
    fp32_err = rel_err(torch.tensor(fp32["logits"]), fp32_ref)
    bf16_err = rel_err(torch.tensor(bf16["logits"]), bf16_ref)
    nf4_err = rel_err(torch.tensor(nf4["logits"]), bf16_ref)
    # the scale of NF4's own error: the same adapter on the unquantized fp32 base against the 4-bit model
    nf4_scale = rel_err(
        logits_of(rosa.load_rosa_model(unquantized(base_dir), tmp_path / "adapter"), ids), bf16_ref
    )
    assert fp32_err < 1e-4
    assert bf16_err < 3e-2 and bf16_err < nf4_scale / 5  # a bf16 merge costs far less than NF4 already did
    assert fp32_err < bf16_err < nf4_err < 2 * nf4_scale  # requantizing costs about one more NF4 rounding
