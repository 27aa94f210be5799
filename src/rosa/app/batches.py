"""From examples to training batches: tokenization with prompt-masked labels, padding, and batch order.

Why a module of its own: ``rosa.app.data`` turns rows into ``Example(prompt, response)`` text pairs; what
a causal LM trains on (token ids, labels at -100 on the prompt, a right-padded batch, and a length-grouped
order that can be saved and resumed mid-epoch) is this module's job, shared by ``rosa train`` and the
benchmarks.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler

from .data import Example

IGNORE_INDEX = -100


# ------------------------------------------------------------------------------------------ tokenizing


def pad_token_id(tokenizer: Any) -> int:
    """The tokenizer's pad id, falling back to EOS (LLaMA-style tokenizers often have no pad token)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    raise ValueError("tokenizer has neither a pad token nor an EOS token; set tokenizer.pad_token")


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """Prompt ids exactly as at generation time (with the tokenizer's own special tokens, e.g. BOS)."""
    return list(tokenizer(prompt)["input_ids"])


def tokenize_example(example: Example, tokenizer: Any, max_length: int) -> dict[str, list[int]]:
    """``input_ids`` = prompt + response + EOS, ``labels`` = -100 on the prompt, ids on the rest.

    Prompt and response are tokenized separately (so the label boundary is exact and the prompt ids are the
    ones generation will see). Truncation policy when the pair exceeds ``max_length``: the prompt is cut
    from the LEFT (its end, with the question and the answer cue, is what matters; a leading BOS is kept)
    but never below ``min(len(prompt), max_length // 2)`` tokens; the response is then cut from the RIGHT
    to fit. A cut response has no EOS, so the model is never taught to stop at an arbitrary cut point.
    """
    if max_length < 2:
        raise ValueError("max_length must be at least 2")
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no EOS token; the response must end in EOS")
    prompt = encode_prompt(tokenizer, example.prompt)
    response = [*tokenizer(example.response, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    if len(prompt) + len(response) > max_length:
        keep = min(len(prompt), max(max_length - len(response), max_length // 2))
        if keep < len(prompt):
            bos = tokenizer.bos_token_id
            head = prompt[:1] if bos is not None and prompt[:1] == [bos] and keep > 1 else []
            prompt = head + prompt[len(prompt) - (keep - len(head)) :]
        response = response[: max_length - len(prompt)]
    return {"input_ids": prompt + response, "labels": [IGNORE_INDEX] * len(prompt) + response}


def tokenize_examples(
    examples: Sequence[Example], tokenizer: Any, max_length: int
) -> list[dict[str, list[int]]]:
    """``tokenize_example`` over a list (features for ``CausalLMCollator``)."""
    return [tokenize_example(e, tokenizer, max_length) for e in examples]


class CausalLMCollator:
    """Pad ``input_ids``/``labels`` features into tensors with an ``attention_mask``.

    Right padding for training (left padding is for generation and lives in ``rosa.app.evaluate``): pad ids in
    ``input_ids`` (pad token, falling back to EOS), -100 in ``labels``, 0 in ``attention_mask``. Features
    without ``labels`` get labels = input_ids.
    """

    def __init__(
        self, tokenizer_or_pad_id: Any, pad_to_multiple_of: int | None = None, padding_side: str = "right"
    ) -> None:
        if padding_side not in ("right", "left"):
            raise ValueError("padding_side must be 'right' or 'left'")
        self.pad_id = (
            tokenizer_or_pad_id if isinstance(tokenizer_or_pad_id, int) else pad_token_id(tokenizer_or_pad_id)
        )
        self.pad_to_multiple_of = pad_to_multiple_of
        self.padding_side = padding_side

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids, labels, mask = [], [], []
        for f in features:
            n = len(f["input_ids"])
            pad = width - n

            def place(seq: Sequence[int], fill: int, pad: int = pad) -> list[int]:
                return [*seq, *[fill] * pad] if self.padding_side == "right" else [*[fill] * pad, *seq]

            ids.append(place(f["input_ids"], self.pad_id))
            labels.append(place(f.get("labels", f["input_ids"]), IGNORE_INDEX))
            mask.append(place([1] * n, 0))
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "attention_mask": torch.tensor(mask, dtype=torch.long),
        }


# ---------------------------------------------------------------------------------------------- sampler


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar length (less padding), in a seeded order whose position can be saved and restored.

    Order for epoch ``e``: a ``torch.randperm`` (generator seeded with ``seed + e``) of all indices is cut
    into mega-batches of ``batch_size * mega_batch_mult``; each is sorted by length (longest first, ties by
    index) and cut into batches; the batches of the whole epoch are then shuffled with the same generator.
    Only the final mega-batch can leave a short batch (dropped with ``drop_last``).

    Resume: ``state_dict()`` is ``{"epoch", "batch_index"}`` plus a fingerprint of the lengths, batch size
    and seed; after ``load_state_dict`` the next ``iter()`` yields the rest of that epoch's order. Iteration
    moves the position as it yields, and a finished epoch advances ``epoch``. With a prefetching
    ``DataLoader`` (``num_workers > 0``) the sampler runs ahead of training: save the position from the
    training loop instead (``load_state_dict({"epoch": e, "batch_index": steps_done_in_epoch})``).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        seed: int = 0,
        mega_batch_mult: int = 16,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1 or mega_batch_mult < 1:
            raise ValueError("batch_size and mega_batch_mult must be positive")
        if not lengths:
            raise ValueError("no examples to sample from")
        self.lengths = [int(n) for n in lengths]
        self.batch_size = batch_size
        self.seed = seed
        self.mega_batch_mult = mega_batch_mult
        self.drop_last = drop_last
        self.epoch = 0
        self.batch_index = 0

    def _fingerprint(self) -> str:
        key = json.dumps([self.lengths, self.batch_size, self.seed, self.mega_batch_mult, self.drop_last])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def batches(self, epoch: int) -> list[list[int]]:
        """The full batch order of ``epoch`` (a pure function of the lengths, settings and seed)."""
        gen = torch.Generator().manual_seed(self.seed + epoch)
        perm = torch.randperm(len(self.lengths), generator=gen).tolist()
        mega = self.batch_size * self.mega_batch_mult
        out: list[list[int]] = []
        for start in range(0, len(perm), mega):
            group = sorted(perm[start : start + mega], key=lambda i: (-self.lengths[i], i))
            out += [group[j : j + self.batch_size] for j in range(0, len(group), self.batch_size)]
        if self.drop_last and out and len(out[-1]) < self.batch_size:
            out.pop()
        return [out[i] for i in torch.randperm(len(out), generator=gen).tolist()]

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = self.batches(self.epoch)
        while self.batch_index < len(order):
            batch = order[self.batch_index]
            self.batch_index += 1
            yield batch
        self.epoch += 1
        self.batch_index = 0

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its first batch."""
        self.epoch, self.batch_index = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """Current position (epoch, batches already yielded in it) plus a settings fingerprint."""
        return {"epoch": self.epoch, "batch_index": self.batch_index, "fingerprint": self._fingerprint()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a position; a fingerprint from different lengths/settings/seed is an error."""
        fp = state.get("fingerprint")
        if fp is not None and fp != self._fingerprint():
            raise ValueError("sampler state was saved for different data, batch size, seed or settings")
        epoch, index = int(state["epoch"]), int(state["batch_index"])
        if not 0 <= index <= len(self):
            raise ValueError(f"batch_index {index} out of range for {len(self)} batches per epoch")
        self.epoch, self.batch_index = epoch, index
