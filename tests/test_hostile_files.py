"""Hostile adapter files: every malformed tensor is refused with a message naming it, through both
``PeftModel.from_pretrained`` and ``rosa.load_rosa_model``, and a pickle-only folder is never unpickled.

Each file is a genuine saved adapter with one tensor edited (``safetensors.torch.save_file``), so everything else
about it is valid and the refusal can only come from the edited tensor.
"""

from __future__ import annotations

import copy
import json
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import WORD_LLAMA, child_env, rosa_llama, set_random_masks, word_llama
from peft import PeftModel
from safetensors.torch import load_file, save_file

import rosa
from rosa import AdapterFileError
from rosa.sparse import support_from_flat_index

pytestmark = pytest.mark.usefixtures("one_thread")

LAYER = "base_model.model.model.layers.0.self_attn.q_proj"  # 32 x 32, capacity 51 at density 0.05
IN_FEATURES = 32


@pytest.fixture(scope="module")
def genuine(tmp_path_factory) -> Path:
    model = rosa_llama()
    set_random_masks(model)
    path = tmp_path_factory.mktemp("genuine")
    model.save_pretrained(path)
    return path


def _edit(tensors: dict[str, torch.Tensor], case: str) -> None:
    offsets, cols = f"{LAYER}.rosa_row_offsets", f"{LAYER}.rosa_col_idx"
    values, lora_a = f"{LAYER}.rosa_values", f"{LAYER}.rosa_A.weight"
    if case == "column_out_of_range":
        tensors[cols] = tensors[cols].clone()
        tensors[cols][-1] = IN_FEATURES  # one past the end: a kernel would read out of bounds
    elif case == "negative_column":
        tensors[cols] = tensors[cols].clone()
        tensors[cols][0] = -1
    elif case == "unsorted_columns":
        row = int(torch.nonzero(tensors[offsets][1:] - tensors[offsets][:-1] >= 2)[0])
        start = int(tensors[offsets][row])
        tensors[cols] = tensors[cols].clone()
        tensors[cols][start], tensors[cols][start + 1] = (
            tensors[cols][start + 1].clone(),
            tensors[cols][start].clone(),
        )
    elif case == "non_monotone_offsets":
        tensors[offsets] = tensors[offsets].clone()
        tensors[offsets][5] = tensors[offsets][7] + 1
    elif case == "last_offset_not_nnz":
        tensors[offsets] = tensors[offsets].clone()
        tensors[offsets][-1] -= 1
    elif case == "offsets_wrong_length":
        tensors[offsets] = torch.cat([tensors[offsets], tensors[offsets][-1:]])
    elif case == "float_columns":
        tensors[cols] = tensors[cols].float()
    elif case == "float_offsets":
        tensors[offsets] = tensors[offsets].double()
    elif case == "int_values":
        tensors[values] = tensors[values].round().to(torch.int32)
    elif case == "values_wrong_shape":
        tensors[values] = torch.zeros(tensors[values].numel() + 1)
    elif case == "lora_a_wrong_rank":
        tensors[lora_a] = torch.zeros(5, IN_FEATURES)
    elif case == "lora_b_wrong_width":
        key = f"{LAYER}.rosa_B.weight"
        tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    elif case == "nan_values":
        tensors[values] = tensors[values].clone()
        tensors[values][3] = float("nan")
    elif case == "inf_lora":
        tensors[lora_a] = tensors[lora_a].clone()
        tensors[lora_a][0, 0] = float("inf")
    elif case == "more_nonzeros_than_capacity":
        capacity = tensors[values].numel()
        support = support_from_flat_index(torch.arange(capacity + 1), (32, IN_FEATURES))
        tensors[offsets] = support.row_offsets
        tensors[cols] = support.col_idx.to(torch.int16)
    elif case == "missing_row_offsets":
        del tensors[offsets]
    elif case == "missing_col_idx":
        del tensors[cols]
    else:  # pragma: no cover
        raise ValueError(case)


# case -> (tensor the message must name, what it must say)
CASES = {
    "column_out_of_range": ("rosa_col_idx", r"column index out of range \[0, 32\).*max 32"),
    "negative_column": ("rosa_col_idx", r"column index out of range.*min -1"),
    "unsorted_columns": ("rosa_col_idx", r"strictly increasing"),
    "non_monotone_offsets": ("rosa_row_offsets", r"not monotone"),
    "last_offset_not_nnz": ("rosa_row_offsets", r"last row offset is \d+ but there are \d+ column indices"),
    "offsets_wrong_length": ("rosa_row_offsets", r"has 34 row offsets, the layer needs 33"),
    "float_columns": ("rosa_col_idx", r"column indices must be an integer tensor, got torch.float32"),
    "float_offsets": ("rosa_row_offsets", r"row offsets must be an integer tensor, got torch.float64"),
    "int_values": ("rosa_values", r"expected a floating-point tensor, got torch.int32"),
    "values_wrong_shape": ("rosa_values", r"shape \(52,\) does not match the model's \(51,\)"),
    "lora_a_wrong_rank": ("rosa_A", r"shape \(5, 32\) does not match the model's \(4, 32\)"),
    "lora_b_wrong_width": ("rosa_B", r"shape \(33, 4\) does not match the model's \(32, 4\)"),
    "nan_values": ("rosa_values", r"NaN or infinite"),
    "inf_lora": ("rosa_A", r"NaN or infinite"),
    "more_nonzeros_than_capacity": ("rosa_col_idx", r"52 nonzeros but the layer holds at most 51"),
    "missing_row_offsets": ("rosa_row_offsets", r"missing"),
    "missing_col_idx": ("rosa_col_idx", r"missing"),
}


def _saved_config() -> rosa.RosaConfig:
    """The settings rosa_llama() saves, as an object: for the ``config=`` load paths."""
    return rosa.RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05)


LOADERS = {
    "peft": lambda base, path: PeftModel.from_pretrained(base, path),
    "rosa": lambda base, path: rosa.load_rosa_model(base, path),
    "peft_config": lambda base, path: PeftModel.from_pretrained(base, path, config=_saved_config()),
    "rosa_config": lambda base, path: rosa.load_rosa_model(base, path, config=_saved_config()),
}


def _hostile_copy(genuine: Path, dest: Path, case: str) -> Path:
    shutil.copytree(genuine, dest)
    tensors = load_file(genuine / "adapter_model.safetensors")
    _edit(tensors, case)
    save_file(tensors, dest / "adapter_model.safetensors")
    return dest


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_tensor_is_refused_naming_it(genuine, tmp_path, case, loader):
    path = _hostile_copy(genuine, tmp_path / case, case)
    tensor, message = CASES[case]
    # the message names the layer and the tensor (as PEFT keys it in the model: adapter name appended)
    pattern = rf"{LAYER}\.{tensor}(\.default)?(\.weight)?: .*{message}"
    with pytest.raises(AdapterFileError, match=pattern):
        LOADERS[loader](word_llama(), path)


def test_the_genuine_file_loads(genuine):
    """The control: the unedited file loads through both entry points (so the refusals above are the edits')."""
    for loader in LOADERS.values():
        model = loader(word_llama(), genuine)
        assert rosa.rosa_layers(model)[LAYER].nnz("default") == 51


def test_refused_second_adapter_leaves_the_first_intact(genuine, tmp_path):
    """``load_adapter`` of a hostile file onto a model already holding a good adapter refuses it, and the good
    adapter keeps working."""
    model = rosa.load_rosa_model(word_llama(), genuine)
    ids = torch.randint(4, 64, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    bad = _hostile_copy(genuine, tmp_path / "bad", "column_out_of_range")
    with pytest.raises(AdapterFileError, match="column index out of range"):
        model.load_adapter(bad, adapter_name="bad")
    model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, before)


# --- pickle ---------------------------------------------------------------------------------------------------


class _WritesMarker:
    """Unpickling this calls ``open(marker, "w")``: creating the file is the evidence that it was unpickled."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def pickle_only(genuine, tmp_path) -> tuple[Path, Path]:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(genuine / "adapter_config.json", folder)
    marker = tmp_path / "UNPICKLED"
    with open(folder / "adapter_model.bin", "wb") as f:
        pickle.dump({"base_model.model.x": _WritesMarker(str(marker))}, f)
    # the payload works: plain pickle.load would create the marker
    assert not marker.exists()
    return folder, marker


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_pickle_only_folder_is_never_unpickled(pickle_only, loader):
    folder, marker = pickle_only
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin.*safetensors only.*refusing to unpickle"):
        LOADERS[loader](word_llama(), folder)
    assert not marker.exists()


def test_folder_with_nothing_but_the_pickle(pickle_only):
    """Without even an adapter_config.json: rosa's loader names the pickle, PEFT's stops at the missing config."""
    folder, marker = pickle_only
    (folder / "adapter_config.json").unlink()
    assert [p.name for p in folder.iterdir()] == ["adapter_model.bin"]
    with pytest.raises(AdapterFileError, match=r"adapter_model\.bin.*refusing to unpickle"):
        rosa.load_rosa_model(word_llama(), folder)
    with pytest.raises(ValueError, match=r"adapter_config\.json"):
        PeftModel.from_pretrained(word_llama(), folder)
    assert not marker.exists()


def test_pickle_only_folder_via_load_adapter(genuine, pickle_only):
    folder, marker = pickle_only
    model = rosa.load_rosa_model(word_llama(), genuine)
    with pytest.raises(AdapterFileError, match="refusing to unpickle"):
        model.load_adapter(folder, adapter_name="second")
    assert not marker.exists()


def test_pickle_only_folder_with_an_explicit_config(genuine, pickle_only):
    """Passing ``config=`` skips RosaConfig.from_pretrained (and so its folder check) in PEFT: RosaModel, which
    PEFT builds first, checks the folder it is about to read, so PEFT's own path refuses the pickle as rosa's does
    (before: PEFT reached torch's unpickler, whose weights_only=True was all that stood in the payload's way)."""
    folder, marker = pickle_only
    config = rosa.RosaConfig.from_pretrained(genuine)
    with pytest.raises(AdapterFileError, match="refusing to unpickle"):
        rosa.load_rosa_model(word_llama(), folder, config=config)
    with pytest.raises(AdapterFileError, match="refusing to unpickle"):
        PeftModel.from_pretrained(word_llama(), folder, config=config)
    assert not marker.exists()


def test_pickle_payload_is_real(tmp_path):
    """The control for the tests above: unpickling the payload does create the marker."""
    marker = tmp_path / "marker"
    pickle.loads(pickle.dumps(_WritesMarker(str(marker))))
    assert marker.exists()


# --- no crash: a refused load in a fresh process exits cleanly ---------------------------------------------------

_CHILD = textwrap.dedent(
    f"""
    import sys, torch
    import rosa
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    def load(path, loader):
        torch.manual_seed(0)
        base = LlamaForCausalLM(LlamaConfig(**{WORD_LLAMA!r}))
        (PeftModel.from_pretrained if loader == "peft" else rosa.load_rosa_model)(base, path)
        print("LOADED", path)

    pairs = list(zip(sys.argv[1::2], sys.argv[2::2]))
    for path, loader in pairs[:-1]:
        try:
            load(path, loader)
        except ValueError as e:
            print(f"{{type(e).__name__}}: {{e}}", file=sys.stderr)
    load(*pairs[-1])  # uncaught: the process must end with Python's own exit status 1 and a traceback
    """
)


def test_refused_load_in_a_subprocess_exits_cleanly(genuine, tmp_path):
    """Out-of-range columns and a forged row-offset array, loaded in a fresh process through both loaders: Python
    exceptions with the messages and exit status 1, never a signal (a negative status: a crash inside a kernel)."""
    col = _hostile_copy(genuine, tmp_path / "col", "column_out_of_range")
    tensors = load_file(genuine / "adapter_model.safetensors")
    # offsets that claim 10**6 nonzeros: a kernel trusting them would read far past the column indices
    forged = tensors[f"{LAYER}.rosa_row_offsets"].clone()
    forged[-1] = 1_000_000
    tensors[f"{LAYER}.rosa_row_offsets"] = forged
    offsets = tmp_path / "offsets"
    shutil.copytree(genuine, offsets)
    save_file(tensors, offsets / "adapter_model.safetensors")

    result = subprocess.run(
        [sys.executable, "-c", _CHILD, str(col), "peft", str(offsets), "rosa", str(col), "rosa"],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(PYTHONWARNINGS="ignore"),
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    assert "LOADED" not in result.stdout
    lines = result.stderr.strip().splitlines()
    assert sum(line.startswith("AdapterFileError: ") for line in lines) == 2, result.stderr[-3000:]
    assert "Traceback" in result.stderr
    assert lines[-1].startswith("rosa.serialization.AdapterFileError: "), lines[-1]
    assert f"{LAYER}.rosa_col_idx.default: support: column index out of range" in result.stderr
    assert "last row offset is 1000000" in result.stderr


LIVE_BASE_WEIGHTS = {  # keys of the wrapped model's own base weights: PEFT's strict=False load would write them
    "targeted layer": f"{LAYER}.base_layer.weight",
    "untargeted module": "base_model.model.model.norm.weight",
}


def _with_extra_tensor(genuine: Path, dest: Path, key: str, value: torch.Tensor, config: dict | None = None):
    shutil.copytree(genuine, dest)
    tensors = load_file(genuine / "adapter_model.safetensors")
    tensors[key] = value
    save_file(tensors, dest / "adapter_model.safetensors")
    if config:
        file = dest / "adapter_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), **config}))
    return dest


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("target", sorted(LIVE_BASE_WEIGHTS))
def test_a_base_model_tensor_smuggled_into_the_file_is_refused(genuine, tmp_path, loader, target):
    """PEFT loads adapter files with strict=False, so an extra tensor named after a live base weight would
    silently replace it. The file is refused before anything loads, and the base model keeps its weights."""
    key = LIVE_BASE_WEIGHTS[target]
    base = word_llama()
    name = key.removeprefix("base_model.model.").replace(".base_layer", "")
    original = base.get_parameter(name).detach().clone()
    dest = _with_extra_tensor(genuine, tmp_path / "smuggled", key, torch.zeros_like(original))
    with pytest.raises(AdapterFileError, match=rf"tensor '{key}' belongs to no RoSA layer"):
        LOADERS[loader](base, dest)
    assert torch.equal(base.get_parameter(name), original)


def test_the_smuggled_tensor_would_have_landed_without_the_check(genuine, tmp_path, monkeypatch):
    """The control for the test above: two checks stand in the way, the folder's (before PEFT reads it, naming
    the file) and the tensors' (against the model, before PEFT copies them in); each alone refuses the file, and
    with both switched off PEFT really writes the tensor into the base model (so the refusal is what protects it)."""
    import rosa.model
    import rosa.serialization

    key = LIVE_BASE_WEIGHTS["untargeted module"]
    dest = _with_extra_tensor(genuine, tmp_path / "smuggled", key, torch.zeros(32))
    monkeypatch.setattr(rosa.serialization, "check_adapter_keys", lambda *a: None)
    with pytest.raises(AdapterFileError, match=rf"tensor '{key}' is not a tensor of adapter 'default'"):
        rosa.load_rosa_model(word_llama(), dest)
    monkeypatch.setattr(rosa.model, "check_loaded_state_dict", lambda *a: None)
    model = rosa.load_rosa_model(word_llama(), dest)
    assert not model.base_model.model.model.norm.weight.any()


@pytest.mark.parametrize(
    ("key", "config"),
    [
        (
            "base_model.model.model.norm.weight",
            {"modules_to_save": ["base_model"]},
        ),  # matches every key's text
        ("base_model.model.lm_head.original_module.weight", {"modules_to_save": ["lm_head"]}),
        ("base_model.model.lm_head.modules_to_save.other.weight", {"modules_to_save": ["lm_head"]}),
        (f"{LAYER}.rosa_B.other.weight", {}),  # another adapter's B
        (f"{LAYER}.base_layer.rosa_values", {}),
    ],
    ids=["entry_base_model", "original_module", "other_copy", "other_adapter", "rosa_name_below_base"],
)
def test_declared_names_cannot_reach_other_weights(genuine, tmp_path, key, config):
    """An entry in the file's own config, or a RoSA-looking name, must not open a way to weights outside
    what it declares."""
    dest = _with_extra_tensor(genuine, tmp_path / "bad", key, torch.zeros(4), config)
    with pytest.raises(AdapterFileError, match="belongs to no RoSA layer"):
        rosa.load_rosa_model(word_llama(), dest)


@pytest.mark.parametrize(
    "extra",
    [{"modules_to_save": ["lm_head"]}, {"modules_to_save": ["norm"]}, {"trainable_token_indices": [5, 6]}],
    ids=["modules_to_save", "modules_to_save_by_suffix", "trainable_tokens"],
)
def test_tensors_the_config_declares_outside_rosa_layers_load(tmp_path, extra):
    """The control: a module in modules_to_save (PEFT matches names by suffix: "norm" takes every *norm), or
    trainable token rows, are saved under non-RoSA names and must still load with their trained values; an
    undeclared base tensor beside them is still refused."""
    config = rosa.RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05, **extra)
    model = rosa_llama(config)
    set_random_masks(model)
    torch.manual_seed(1)
    declared = [(n, p) for n, p in model.named_parameters() if p.requires_grad and "rosa_" not in n]
    assert declared  # the setting really adds non-RoSA trainable tensors
    with torch.no_grad():
        for _, p in declared:
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path / "ok")
    keys = list(load_file(tmp_path / "ok" / "adapter_model.safetensors"))
    assert any("rosa_" not in k for k in keys)
    loads = [LOADERS["peft"], LOADERS["rosa"]]  # under the folder's own config, which declares them
    loads += [  # under a config= that declares them too
        lambda base, path: PeftModel.from_pretrained(base, path, config=copy.deepcopy(config)),
        lambda base, path: rosa.load_rosa_model(base, path, config=copy.deepcopy(config)),
    ]
    for load in loads:
        loaded = dict(load(word_llama(), tmp_path / "ok").named_parameters())
        for name, p in declared:
            assert torch.equal(loaded[name], p)
    key = "base_model.model.model.layers.0.mlp.down_proj.base_layer.weight"
    dest = _with_extra_tensor(tmp_path / "ok", tmp_path / "bad", key, torch.zeros(32, 64))
    with pytest.raises(AdapterFileError, match="belongs to no RoSA layer"):
        rosa.load_rosa_model(word_llama(), dest)


def test_an_explicit_config_decides_what_the_file_may_hold(tmp_path):
    """Given ``config=``, PEFT loads the file under that config, not the folder's: a folder whose own config
    declares ``modules_to_save=["norm"]`` cannot carry norm weights into a model loaded under a config that
    declares nothing (PEFT would write them over the base model's). Under a config that declares them, they load."""

    def config(**extra):
        return rosa.RosaConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05, **extra)

    model = rosa_llama(config(modules_to_save=["norm"]))
    set_random_masks(model)
    with torch.no_grad():
        model.base_model.model.model.norm.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path / "ad")
    base = word_llama()
    original = base.model.norm.weight.detach().clone()
    with pytest.raises(
        AdapterFileError, match=r"tensor 'base_model\.model\.model\..*norm\.weight' belongs to no"
    ):
        rosa.load_rosa_model(base, tmp_path / "ad", config=config())
    assert torch.equal(base.model.norm.weight, original)
    loaded = rosa.load_rosa_model(word_llama(), tmp_path / "ad", config=config(modules_to_save=["norm"]))
    trained = model.base_model.model.model.norm.modules_to_save["default"].weight
    assert torch.equal(loaded.base_model.model.model.norm.modules_to_save["default"].weight, trained)


def test_resized_vocabulary_embeddings_load_only_where_declared(tmp_path):
    """PEFT saves the embedding and head weights of a model whose vocabulary was resized (save_embedding_layers);
    loaded as they are, they would replace the base model's own, exactly as a hostile file's would. So they are
    refused, naming the way to load them: a config declaring the layers in modules_to_save, which loads them
    into a trained copy (the logits then match the saved model's)."""
    base = word_llama()
    base.resize_token_embeddings(base.config.vocab_size + 8)
    model = rosa.get_rosa_model(base, rosa.RosaConfig(task_type="CAUSAL_LM", r=4, density=0.05))
    set_random_masks(model)
    model.save_pretrained(tmp_path / "ad", save_embedding_layers=True)
    keys = list(load_file(tmp_path / "ad" / "adapter_model.safetensors"))
    assert any(k.endswith("embed_tokens.weight") for k in keys)

    def resized():
        other = word_llama()
        other.resize_token_embeddings(other.config.vocab_size + 8)
        with torch.no_grad():  # other new rows than the saved model's: the file's must win
            for layer in (other.get_input_embeddings(), other.get_output_embeddings()):
                layer.weight[-8:] += 1.0
        return other

    for load in LOADERS.values():
        with pytest.raises(
            AdapterFileError,
            match=r"(embed_tokens|lm_head)\.weight' belongs to no RoSA layer.*modules_to_save",
        ):
            load(resized(), tmp_path / "ad")
    declared = {"modules_to_save": ["embed_tokens", "lm_head"]}
    config = rosa.RosaConfig(task_type="CAUSAL_LM", r=4, density=0.05, **declared)
    loaded = rosa.load_rosa_model(resized(), tmp_path / "ad", config=config)
    ids = torch.randint(4, 72, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


# --- adapters named by hub id ---------------------------------------------------------------------------------


class FakeHub:
    """A hub served from ``root/<owner>/<name>/``: every ``hf_hub_download`` PEFT and rosa make reads from it, a
    missing file raising the hub's not-found error; ``downloads`` records what was fetched."""

    def __init__(self, root: Path) -> None:
        self.root, self.downloads = root, []

    def __truediv__(self, part: str) -> Path:
        return self.root / part

    def download(self, repo_id, filename, subfolder=None, **kwargs):
        from huggingface_hub.errors import EntryNotFoundError

        file = self.root / repo_id / (subfolder or "") / filename
        if not file.is_file():
            raise EntryNotFoundError(f"{repo_id}: no {filename}")
        self.downloads.append(filename)
        return str(file)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch) -> FakeHub:
    import huggingface_hub
    import peft.config
    import peft.utils.save_and_load

    hub = FakeHub(tmp_path / "hub")
    for module in (huggingface_hub, peft.config, peft.utils.save_and_load):
        monkeypatch.setattr(module, "hf_hub_download", hub.download)
    monkeypatch.setattr(
        peft.utils.save_and_load,
        "file_exists",
        lambda repo_id, filename, **kw: (hub.root / repo_id / filename).is_file(),
    )
    return hub


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_a_hub_adapter_is_checked_before_peft_loads_it(genuine, fake_hub, loader):
    """The key check applies to a hub id too: the files are fetched into the cache PEFT reads next, and a base
    weight smuggled into them is refused, the base model untouched. The genuine adapter from the same hub loads."""
    key = LIVE_BASE_WEIGHTS["untargeted module"]
    _with_extra_tensor(genuine, fake_hub / "evil" / "adapter", key, torch.zeros(32))
    shutil.copytree(genuine, fake_hub / "good" / "adapter")
    base = word_llama()
    with pytest.raises(AdapterFileError, match=rf"tensor '{key}' belongs to no RoSA layer"):
        LOADERS[loader](base, "evil/adapter")
    assert base.model.norm.weight.all()
    model = LOADERS[loader](word_llama(), "good/adapter")
    assert rosa.rosa_layers(model)[LAYER].nnz("default") == 51
    assert "adapter_model.safetensors" in fake_hub.downloads


def test_a_hub_adapter_in_a_subfolder_is_checked(genuine, fake_hub):
    key = LIVE_BASE_WEIGHTS["targeted layer"]
    _with_extra_tensor(genuine, fake_hub / "evil" / "repo" / "run1", key, torch.zeros(32, 32))
    with pytest.raises(AdapterFileError, match=rf"tensor '{key}'"):
        rosa.load_rosa_model(word_llama(), "evil/repo", subfolder="run1")


def test_a_pickle_only_hub_adapter_is_never_unpickled(pickle_only, fake_hub):
    """PEFT falls back to adapter_model.bin when a hub repo has no safetensors file; rosa refuses first."""
    folder, marker = pickle_only
    shutil.copytree(folder, fake_hub / "evil" / "pickled")
    for load in LOADERS.values():
        with pytest.raises(AdapterFileError, match=r"evil/pickled: no adapter_model\.safetensors on the hub"):
            load(word_llama(), "evil/pickled")
    assert not marker.exists()


def test_a_hub_adapter_passed_with_its_config_is_still_checked(genuine, fake_hub):
    """Given ``config=``, PEFT skips the config loader (where the hub check runs): load_rosa_model checks anyway."""
    key = LIVE_BASE_WEIGHTS["untargeted module"]
    _with_extra_tensor(genuine, fake_hub / "evil" / "adapter", key, torch.zeros(32))
    config = rosa.RosaConfig.from_pretrained(genuine)
    with pytest.raises(AdapterFileError, match=rf"tensor '{key}'"):
        rosa.load_rosa_model(word_llama(), "evil/adapter", config=config)


def test_an_uncached_hub_adapter_offline_names_the_cache(genuine, fake_hub, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    shutil.copytree(genuine, fake_hub / "good" / "adapter")
    real = huggingface_hub.hf_hub_download

    def offline(repo_id, filename, **kwargs):
        if filename.endswith(".safetensors"):
            raise LocalEntryNotFoundError("not cached")
        return real(repo_id, filename, **kwargs)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(AdapterFileError, match="not in the local hub cache"):
        rosa.RosaConfig.from_pretrained("good/adapter")


def test_an_unreachable_hub_adapter_fails_once_with_the_reason(fake_hub):
    """A hub id whose config cannot be fetched (no such repo, offline) is refused by rosa in one message, before
    PEFT retries the same download; a missing local path is left to PEFT's own message."""
    with pytest.raises(AdapterFileError, match=r"nosuch/adapter: no local folder .*EntryNotFoundError"):
        rosa.RosaConfig.from_pretrained("nosuch/adapter")
    assert not fake_hub.downloads
    with pytest.raises(ValueError, match=r"Can't find 'adapter_config\.json'"):
        rosa.RosaConfig.from_pretrained("/nonexistent/folder/adapter")


@pytest.mark.parametrize("spec", [[10**8], [3, WORD_LLAMA["vocab_size"]], {"embed_tokens": [10**8]}])
def test_token_indices_outside_the_embedding_are_refused_before_peft_indexes_with_them(tmp_path, spec):
    """In a config, and in a saved adapter's config: one line naming the token, never PEFT's IndexError (a
    device-side assert on CUDA)."""
    config = rosa.RosaConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05, trainable_token_indices=spec
    )
    with pytest.raises(rosa.RosaConfigError, match="outside the embedding's"):
        rosa.get_rosa_model(word_llama(), config)
    folder = tmp_path / "adapter"
    good = rosa.RosaConfig(
        task_type="CAUSAL_LM", r=4, lora_alpha=8, density=0.05, trainable_token_indices=[5]
    )
    model = rosa_llama(good)
    set_random_masks(model)
    model.save_pretrained(folder)
    saved = json.loads((folder / "adapter_config.json").read_text())
    saved["trainable_token_indices"] = spec
    (folder / "adapter_config.json").write_text(json.dumps(saved))
    for load in (LOADERS["peft"], LOADERS["rosa"]):
        with pytest.raises(rosa.RosaConfigError, match="outside the embedding's"):
            load(word_llama(), folder)
