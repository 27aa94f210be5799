"""Shared test setup. Triton kernels run on CPU tensors under the interpreter when no GPU is present; the
variable must be set before anything imports triton. The tests never reach the Hugging Face hub: offline mode is
set before huggingface_hub reads it (a Trainer's background hub lookup once crashed the whole run in getaddrinfo
on a machine with no route out)."""

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Run tiny models on one thread (restored afterwards). On shared cores, two threads per op made them ten
    times slower; one thread also makes the logits bitwise reproducible across processes. A module that wants it
    lists it in its ``pytestmark``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny random LLaMA saved with the default model's tokenizer (converted once and cached)."""
    from tiny_models import tiny_llama_config
    from transformers import AutoTokenizer, LlamaForCausalLM

    from rosa.app.default_model import DefaultModelUnavailable, default_model_path

    try:
        tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    except DefaultModelUnavailable as e:
        pytest.skip(str(e))
    torch.manual_seed(0)
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
