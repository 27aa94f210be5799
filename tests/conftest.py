"""Shared test setup. Triton kernels run on CPU tensors under the interpreter when no GPU is present; the
variable must be set before anything imports triton."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
