"""Fuzzing the adapter file: a genuine saved RoSA adapter, mutated in a fixed-seed set of ways (keys dropped, added,
renamed; dtypes and shapes changed; row offsets and column indices out of range, negative, unsorted; NaN and inf
values; base model weights smuggled in; whole layers dropped or moved to layers the model lacks), is loaded through
the four ways an adapter reaches a model (``PeftModel.from_pretrained`` with and without ``config=``,
``load_adapter``, ``set_peft_model_state_dict``), then run forward and backward.

Each mutant must either be refused with rosa's ``AdapterFileError`` or load and compute finite logits, loss and
gradients: never another exception, never NaN, never a crash. The loads run in child processes (many mutants per
child, outcomes reported as JSON lines) so that a crash inside a kernel shows up as a signal naming the mutant
instead of taking pytest down with it.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import random
import shutil
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from helpers import child_env
from safetensors.torch import load_file, save_file

TESTS = Path(__file__).resolve().parent
WEIGHTS = "adapter_model.safetensors"
SEED = 0
RANDOM_MUTANTS = 64
CHILD_TIMEOUT_S = 240
SAVED = ("rosa_A.weight", "rosa_B.weight", "rosa_values", "rosa_row_offsets", "rosa_col_idx")
DERIVED = ("rosa_t_row_offsets", "rosa_t_col_idx", "rosa_t_perm")
LOADS = ("from_pretrained", "from_pretrained_config", "load_adapter", "set_peft_model_state_dict")
BASE_WEIGHTS = {  # base model tensors a file could name, with their shapes in the tiny LLaMA
    "base_model.model.model.embed_tokens.weight": (128, 32),
    "base_model.model.lm_head.weight": (128, 32),
    "base_model.model.model.norm.weight": (32,),
    "base_model.model.model.layers.0.input_layernorm.weight": (32,),
    "base_model.model.model.layers.1.self_attn.q_proj.base_layer.weight": (32, 32),
}

Tensors = dict[str, torch.Tensor]


def _config():
    import rosa

    return rosa.RosaConfig(task_type="CAUSAL_LM", r=2, lora_alpha=4, density=0.05)


def _masked_model(seed: int):
    """The tiny LLaMA with a RoSA adapter whose support, values and B are random (seeded)."""
    from helpers import set_random_masks
    from tiny_models import tiny_llama

    import rosa

    model = rosa.get_rosa_model(tiny_llama(0), _config())
    set_random_masks(model, seed=seed)
    return model


# --- mutations: each edits the tensors in place and returns what it did ------------------------------------------


def _layers(tensors: Tensors) -> list[str]:
    return sorted({key.split(".rosa_")[0] for key in tensors if ".rosa_" in key})


def _pick(rng: random.Random, tensors: Tensors, suffix: str | None = None) -> str:
    keys = sorted(k for k in tensors if suffix is None or k.endswith(suffix))
    return rng.choice(keys or sorted(tensors))


def _transpose(tensors: Tensors, layer: str) -> dict[str, torch.Tensor]:
    """The derived support rosa would rebuild for ``layer`` at load time, as a file could carry it; empty when an
    earlier mutation already broke the layer's CSR."""
    from rosa.sparse.support import support_from_csr

    try:
        support = support_from_csr(
            tensors[f"{layer}.rosa_row_offsets"].long(),
            tensors[f"{layer}.rosa_col_idx"].long(),
            tensors[f"{layer}.rosa_A.weight"].shape[1],
        )
    except Exception:
        return {}
    return {attr: getattr(support, attr[len("rosa_") :]) for attr in DERIVED}


def drop_key(tensors: Tensors, rng: random.Random) -> str:
    key = _pick(rng, tensors)
    del tensors[key]
    return f"drop {key}"


def drop_support(tensors: Tensors, rng: random.Random) -> str:
    layer = rng.choice(_layers(tensors))
    for attr in ("rosa_row_offsets", "rosa_col_idx"):
        tensors.pop(f"{layer}.{attr}", None)
    return f"drop the CSR of {layer}"


def add_derived(tensors: Tensors, rng: random.Random) -> str:
    """Add transposed-support keys (which rosa never saves): genuine, random or of the wrong dtype; named as
    PEFT keys a file (no adapter name) or as the model keys them (``.default``)."""
    layer = rng.choice([n for n in _layers(tensors) if f"{n}.rosa_col_idx" in tensors] or _layers(tensors))
    attrs = rng.sample(DERIVED, rng.randint(1, 3))
    suffix = rng.choice(["", ".default"])
    kind = rng.choice(["genuine", "random", "float"])
    genuine = _transpose(tensors, layer)
    for attr in attrs:
        if kind == "genuine" and attr in genuine:
            tensor = genuine[attr]
        else:
            tensor = torch.randint(
                -5,
                1 << 15,
                (rng.randint(0, 80),),
                generator=torch.Generator().manual_seed(rng.randrange(1 << 30)),
            )
            tensor = (
                tensor.float()
                if kind == "float"
                else tensor.to(rng.choice([torch.int16, torch.int32, torch.int64]))
            )
        tensors[f"{layer}.{attr}{suffix}"] = tensor
    return f"add {kind} {', '.join(attrs)}{suffix} to {layer}"


def smuggle_transpose(tensors: Tensors, rng: random.Random, whole: bool = False) -> str:
    """A corrupt transposed support in place of (part of) the CSR it derives from; ``whole``: the CSR is gone
    entirely and the permutation points far out of range (once a segfault: nothing validated such a file)."""
    layer = rng.choice(_layers(tensors))
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    derived = _transpose(tensors, layer) or {a: torch.randint(0, 32, (20,), generator=g) for a in DERIVED}
    csr = ("rosa_row_offsets", "rosa_col_idx")
    drop = csr if whole else rng.choice([csr, csr[:1], csr[1:]])
    for attr in drop:
        tensors.pop(f"{layer}.{attr}", None)
    for attr, tensor in derived.items():
        if len(tensor) and (attr == "rosa_t_perm" or rng.random() < 0.5):
            tensor = tensor.clone()
            tensor[rng.randrange(len(tensor))] = 1 << 20 if whole else rng.choice([-1, 1 << 20, len(tensor)])
        tensors[f"{layer}.{attr}"] = tensor
    return f"replace {', '.join(drop)} of {layer} by a corrupt transposed support"


def add_unknown_key(tensors: Tensors, rng: random.Random) -> str:
    layer = rng.choice(_layers(tensors))
    key = rng.choice(
        [
            f"{layer}.rosa_bogus",
            f"{layer.replace('layers.0', 'layers.9').replace('layers.1', 'layers.9')}.rosa_values",
            f"{layer}.rosa_values.default",
            f"{layer}.rosa_A.default.weight",
        ]
    )
    tensors[key] = torch.randn(rng.randint(0, 64))
    return f"add {key}"


def rename_key(tensors: Tensors, rng: random.Random) -> str:
    key = _pick(rng, tensors)
    layers = _layers(tensors)
    attr = next((a for a in SAVED if key.endswith(a)), None)
    if attr is None:
        new = key + ".default"
    else:
        new = rng.choice(
            [
                key.replace(key[: -len(attr) - 1], rng.choice(layers)),  # the same tensor on another layer
                key[: -len(attr)]
                + rng.choice([a for a in SAVED if a != attr]),  # another tensor of the layer
                key + rng.choice([".default", ".weight", "_"]),
            ]
        )
    tensors[new] = tensors.pop(key)
    return f"rename {key} -> {new}"


def change_dtype(tensors: Tensors, rng: random.Random) -> str:
    key = _pick(rng, tensors)
    dtype = rng.choice(
        [
            torch.float16,
            torch.bfloat16,
            torch.float64,
            torch.int8,
            torch.int16,
            torch.int32,
            torch.int64,
            torch.uint8,
            torch.bool,
        ]
    )
    tensors[key] = tensors[key].to(dtype)
    return f"{key} to {dtype}"


def change_shape(tensors: Tensors, rng: random.Random) -> str:
    key = _pick(rng, tensors)
    tensor = tensors[key]
    how = rng.choice(["flatten", "unsqueeze", "one more", "one less", "empty", "scalar", "transpose"])
    if how == "flatten":
        tensor = tensor.flatten()
    elif how == "unsqueeze":
        tensor = tensor.unsqueeze(0)
    elif how == "one more" and tensor.numel():
        tensor = torch.cat([tensor.flatten(), tensor.flatten()[-1:]])
    elif how == "one less" and tensor.numel():
        tensor = tensor.flatten()[:-1]
    elif how == "empty":
        tensor = tensor.flatten()[:0]
    elif how == "scalar" and tensor.numel():
        tensor = tensor.flatten()[0].clone()
    elif how == "transpose" and tensor.dim() == 2:
        tensor = tensor.t().contiguous()
    tensors[key] = tensor.contiguous()
    return f"{key}: {how} -> {tuple(tensor.shape)}"


def corrupt_offsets(tensors: Tensors, rng: random.Random) -> str:
    key = _pick(rng, tensors, ".rosa_row_offsets")
    offsets = tensors[key].clone().long()
    i = rng.randrange(len(offsets))
    how = rng.choice(["huge", "negative", "min", "past nnz", "non-monotone", "first not 0", "last short"])
    if how == "huge":
        offsets[i] = (1 << 31) - 1
    elif how == "negative":
        offsets[i] = -1
    elif how == "min":
        offsets[i] = -(1 << 31)
    elif how == "past nnz":
        offsets[i] = int(offsets[-1]) + 1
    elif how == "non-monotone" and len(offsets) > 2:
        j = rng.randrange(1, len(offsets) - 1)
        offsets[j] = int(offsets[j + 1]) + 3
    elif how == "first not 0":
        offsets[0] = 1
    else:
        offsets[-1] = max(int(offsets[-1]) - 1, 0)
    tensors[key] = offsets.to(rng.choice([torch.int32, torch.int64]))
    return f"{key}: {how}"


def corrupt_columns(tensors: Tensors, rng: random.Random) -> str:
    key = _pick(rng, tensors, ".rosa_col_idx")
    cols = tensors[key].clone().long()
    if not len(cols):
        return f"{key}: empty, left alone"
    i = rng.randrange(len(cols))
    how = rng.choice(
        ["in_features", "int16 max", "int32 huge", "negative", "duplicate", "reversed", "int16 wrap"]
    )
    if how == "in_features":
        cols[i] = 32 if "mlp.down_proj" not in key else 64
    elif how == "int16 max":
        cols[i] = (1 << 15) - 1
    elif how == "int32 huge":
        cols[i] = (1 << 31) - 1
    elif how == "negative":
        cols[i] = -rng.randint(1, 1 << 15)
    elif how == "duplicate" and i + 1 < len(cols):
        cols[i + 1] = cols[i]
    elif how == "reversed":
        cols = cols.flip(0)
    else:
        tensors[key] = torch.full_like(tensors[key], -1).to(torch.int16)
        return f"{key}: {how}"
    tensors[key] = cols.to(
        torch.int32 if int(cols.abs().max()) >= 1 << 15 else rng.choice([torch.int16, torch.int32])
    )
    return f"{key}: {how}"


def non_finite(tensors: Tensors, rng: random.Random) -> str:
    key = _pick(rng, tensors, rng.choice(["rosa_values", "rosa_A.weight", "rosa_B.weight"]))
    tensor = tensors[key].clone()
    value = rng.choice([float("nan"), float("inf"), float("-inf")])
    if tensor.numel():
        tensor.view(-1)[rng.randrange(tensor.numel())] = value
    tensors[key] = tensor
    return f"{key}: one {value}"


def add_base_weight(tensors: Tensors, rng: random.Random) -> str:
    """A base model weight (embedding, head, a norm, a wrapped layer's own weight): NaN, zeros, random values or
    the wrong shape. PEFT would write any of them over the base model."""
    key = rng.choice(sorted(BASE_WEIGHTS))
    shape = BASE_WEIGHTS[key]
    how = rng.choice(["nan", "zeros", "random", "wrong shape"])
    g = torch.Generator().manual_seed(rng.randrange(1 << 30))
    if how == "wrong shape":
        shape = (shape[0] + 1, *shape[1:])
    tensor = torch.randn(shape, generator=g)
    if how == "nan":
        tensor.view(-1)[0] = float("nan")
    elif how == "zeros":
        tensor.zero_()
    tensors[key] = tensor
    return f"add {key} ({how})"


def drop_layer(tensors: Tensors, rng: random.Random) -> str:
    layer = rng.choice(_layers(tensors))
    for key in [k for k in tensors if k.startswith(f"{layer}.rosa_")]:
        del tensors[key]
    return f"drop every tensor of {layer}"


def move_layer(tensors: Tensors, rng: random.Random) -> str:
    """A layer's tensors under the name of a layer the model does not have (another index, a lookalike letter)."""
    layer = rng.choice(_layers(tensors))
    other = rng.choice(
        [layer.replace("layers.", "layers.1"), layer.replace("proj", "pr\u043ej"), layer + "_x"]
    )
    for key in [k for k in tensors if k.startswith(f"{layer}.rosa_")]:
        tensors[other + key[len(layer) :]] = tensors.pop(key)
    return f"move {layer} to {other!r}"


MUTATIONS: list[Callable[[Tensors, random.Random], str]] = [
    drop_key,
    drop_support,
    add_derived,
    smuggle_transpose,
    add_unknown_key,
    rename_key,
    change_dtype,
    change_shape,
    corrupt_offsets,
    corrupt_columns,
    non_finite,
    add_base_weight,
    drop_layer,
    move_layer,
]


def mutants(genuine: Tensors, seed: int = SEED, count: int = RANDOM_MUTANTS) -> list[tuple[str, Tensors]]:
    """Every mutation once on its own, then ``count`` random compositions of one to three of them."""
    rng = random.Random(seed)
    plans = (
        [[m] for m in MUTATIONS]
        + [[functools.partial(smuggle_transpose, whole=True)]]
        + [rng.choices(MUTATIONS, k=rng.choice([1, 1, 2, 3])) for _ in range(count)]
    )
    out = []
    for plan in plans:
        tensors = dict(genuine)
        out.append(("; ".join(m(tensors, rng) for m in plan), tensors))
    return out


# --- the child: load each mutant three ways, then forward and backward ---------------------------------------------


def _forward_backward(model) -> str | None:
    """Forward and backward with each sparse strategy (the sparse kernels, then a dense fold of S): None if the
    logits, the loss and every adapter gradient are finite, else what was not."""
    import rosa

    for name, param in model.named_parameters():
        param.requires_grad_(".rosa_" in name)
    ids = torch.randint(4, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for strategy in ("spmm", "fold"):
        for layer in rosa.rosa_layers(model).values():
            layer.sparse_strategy = dict.fromkeys(layer.sparse_strategy, strategy)
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        if not (bool(torch.isfinite(out.logits).all()) and bool(torch.isfinite(out.loss))):
            return f"non-finite logits or loss ({strategy})"
        for name, param in model.named_parameters():
            if param.grad is not None and not bool(torch.isfinite(param.grad).all()):
                return f"non-finite gradient of {name} ({strategy})"
    return None


def _load(how: str, folder: str, base, masked):
    from peft import PeftModel, set_peft_model_state_dict

    if how == "from_pretrained":
        return PeftModel.from_pretrained(copy.deepcopy(base), folder)
    if how == "from_pretrained_config":
        return PeftModel.from_pretrained(copy.deepcopy(base), folder, config=_config())
    model = copy.deepcopy(masked)
    if how == "load_adapter":
        model.load_adapter(folder, adapter_name="default")
    else:
        set_peft_model_state_dict(model, load_file(os.path.join(folder, WEIGHTS)), adapter_name="default")
    return model


def _changed_base_weight(model, base) -> str | None:
    """The first of the base model's own weights the load changed, if any (PEFT's strict=False load writes any
    tensor a file names over the model)."""
    original = dict(base.named_parameters())
    for name, param in model.named_parameters():
        if "rosa_" in name or "modules_to_save" in name:
            continue
        plain = (
            name.removeprefix("base_model.model.").replace(".base_layer", "").replace(".original_module", "")
        )
        if plain in original and not torch.equal(param.detach(), original[plain].detach()):
            return name
    return None


def _outcome(how: str, folder: str, base, masked) -> str:
    from rosa import AdapterFileError

    try:
        model = _load(how, folder, base, masked)
    except AdapterFileError as e:
        return f"refused: {e}"
    except Exception as e:
        return "error: " + "".join(traceback.format_exception_only(e)).strip()[-600:]
    changed = _changed_base_weight(model, base)
    if changed is not None:
        return f"wrong: the load changed the base model's {changed}"
    try:
        problem = _forward_backward(model)
    except Exception as e:
        return "error in forward/backward: " + "".join(traceback.format_exception(e))[-1500:]
    return f"wrong: {problem}" if problem else "ok"


def child() -> None:
    """Load each (folder, how) pair read from stdin; one JSON line before and one with the outcome after, so a
    crash names the pair."""
    import warnings

    from tiny_models import tiny_llama

    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    base, masked = tiny_llama(0), _masked_model(seed=1)
    for folder, how in json.load(sys.stdin):
        print(json.dumps({"start": [folder, how]}), flush=True)
        print(json.dumps({"done": [folder, how], "outcome": _outcome(how, folder, base, masked)}), flush=True)


def run_children(folders: list[str]) -> dict[tuple[str, str], str]:
    """The outcome of every (folder, load path). A child that dies (a signal, a timeout) blames the pair it had
    started, and the pairs after it run in a fresh child."""
    results: dict[tuple[str, str], str] = {}
    todo = [(folder, how) for folder in folders for how in LOADS]
    env = child_env(PYTHONWARNINGS="ignore")
    code = f"import sys; sys.path.insert(0, {str(TESTS)!r}); from test_adapter_fuzz import child; child()"
    while todo:
        try:
            proc = subprocess.run(
                [sys.executable, "-c", code],
                input=json.dumps(todo),
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
                env=env,
            )
            stdout, status = proc.stdout, f"exit status {proc.returncode}: ...{proc.stderr[-500:]}"
        except subprocess.TimeoutExpired as e:
            partial = e.stdout or ""
            stdout = partial.decode() if isinstance(partial, bytes) else partial
            status = f"no answer within {CHILD_TIMEOUT_S} s"
        started = None
        for line in stdout.splitlines():
            record = json.loads(line) if line.startswith("{") else {}
            if "start" in record:
                started = tuple(record["start"])
            if "done" in record:
                results[tuple(record["done"])] = record["outcome"]
        todo = [pair for pair in todo if pair not in results]
        if todo:
            culprit = started if started in todo else todo[0]
            results[culprit] = f"crash: {status}"
            todo.remove(culprit)
    return results


# --- the test ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("genuine")
    _masked_model(seed=0).save_pretrained(path)
    return path


def test_mutated_adapter_files_are_refused_or_compute_finite_results(genuine, tmp_path):
    tensors = load_file(genuine / WEIGHTS)
    cases = mutants(tensors)
    folders = {}
    for i, (description, mutated) in enumerate(cases):
        folder = tmp_path / f"mutant-{i:03d}"
        shutil.copytree(genuine, folder)
        save_file(mutated, folder / WEIGHTS)
        folders[str(folder)] = description
    results = run_children([*folders, str(genuine)])

    assert {results[str(genuine), how] for how in LOADS} == {"ok"}  # the control: the genuine file loads
    failures = [
        f"{Path(folder).name} ({description}) via {how}: {results[folder, how]}"
        for folder, description in folders.items()
        for how in LOADS
        if not results[folder, how].startswith(("ok", "refused: "))
    ]
    assert not failures, "\n".join(failures)
    outcomes = [results[folder, how] for folder in folders for how in LOADS]
    # the mutants exercise both answers: most are refused, and the harmless ones (a dropped key, an unused key) load
    assert sum(o.startswith("refused") for o in outcomes) > len(outcomes) // 3
    assert "ok" in outcomes
