"""What every example shares: command-line flags, the model and a small offline dataset.

The examples default to the built-in SmolLM2-135M (offline) and rosa's synthetic task (reverse the letters of a
made-up word); ``--model`` takes any causal LM id or folder, which is how the test suite runs them on a tiny model.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rosa.app.data import synthetic_splits
from rosa.app.default_model import resolve_model_path


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", default="smollm2-135m", help="causal LM id or folder (default: built-in)")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="example-adapter", help="where the adapter is saved")
    return parser.parse_args()


def load(name: str, **kwargs):
    path = resolve_model_path(name)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs), tokenizer


def texts(n: int = 256) -> list[str]:
    """Prompt + response as one training text per example."""
    train, _ = synthetic_splits()
    return [f"{e.prompt}{e.response}" for e in train[:n]]
