"""Exact-match scoring of the RoSA paper's tasks, batched greedy generation and held-out loss.

Why: the paper reports exact match per task (GSM8K final number, ViGGO meaning representation, SQL query);
these functions score a fine-tuned model the same way so runs can be compared, and return plain
JSON-serialisable results.

Metrics (prediction = the generated text up to EOS; reference = the example's response):

- ``gsm8k``: the reference's number after ``####`` against the prediction's number after its last ``####``
  (or, without one, its last number); numbers are normalised (``$``/commas removed, ``72.0`` == ``72``).
- ``viggo``: exact string match after collapsing whitespace. Slot order matters (``inform(name[X],
  rating[Y])`` != ``inform(rating[Y], name[X])``), as in the paper's exact-match accuracy.
- ``sql``: exact match of normalised queries: any ``[SQL] ... [/SQL]`` wrapper and trailing ``;`` removed,
  double-quoted strings turned into single-quoted ones, the query split into tokens (string literals,
  words, numbers, operators, punctuation) joined by single spaces, everything but string literals lowercased
  (so ``COUNT(*)`` == ``count ( * )``; ``'Texas'`` != ``'texas'``).
- ``synthetic`` and ``generic``: exact string match after stripping surrounding whitespace (``generic``
  also collapses inner whitespace).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from decimal import Decimal, InvalidOperation
from typing import Any

import torch

from .batches import IGNORE_INDEX, encode_prompt, pad_token_id
from .data import Example, get_task, strip_sql_wrapper

DEFAULT_MAX_NEW_TOKENS = {"gsm8k": 256, "viggo": 128, "sql": 128, "synthetic": 16, "generic": 256}

_NUMBER = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def normalize_number(text: str) -> str | None:
    """Canonical form of a number: ``"1,000"`` -> ``"1000"``, ``"72.0"`` -> ``"72"``, ``"$-3.50"`` -> ``"-3.5"``."""
    cleaned = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_gsm8k_answer(text: str) -> str | None:
    """The normalised number after the last ``####``, else the last number in the text, else None."""
    if "####" in text:
        m = _NUMBER.search(text.rsplit("####", 1)[1])
        if m:
            return normalize_number(m.group())
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def gsm8k_match(prediction: str, reference: str) -> bool:
    """Whether the final numbers agree (a reference without a number never matches)."""
    ref = extract_gsm8k_answer(reference)
    return ref is not None and extract_gsm8k_answer(prediction) == ref


def normalize_whitespace(text: str) -> str:
    """Collapse whitespace runs to one space and strip."""
    return " ".join(text.split())


def viggo_match(prediction: str, reference: str) -> bool:
    """Exact meaning-representation match after whitespace normalisation (slot order matters)."""
    return normalize_whitespace(prediction) == normalize_whitespace(reference)


_SQL_TOKEN = re.compile(
    r"'(?:[^']|'')*'"  # single-quoted literal ('' escapes a quote)
    r'|"(?:[^"]|"")*"'  # double-quoted literal (Spider uses these for strings)
    r"|\d+(?:\.\d+)?|\w+"  # numbers, words
    r"|<=|>=|<>|!=|==|\|\|"  # two-character operators
    r"|\S"  # any other single symbol
)


def normalize_sql(query: str) -> str:
    """Canonical token string of a query (see the module docstring for the rules)."""
    query = strip_sql_wrapper(query).strip().rstrip(";").strip()
    tokens = []
    for tok in _SQL_TOKEN.findall(query):
        if tok.startswith("'"):
            tokens.append(tok)
        elif tok.startswith('"'):
            tokens.append("'" + tok[1:-1].replace('""', '"').replace("'", "''") + "'")
        else:
            tokens.append(tok.lower())
    return " ".join(tokens)


def sql_match(prediction: str, reference: str) -> bool:
    """Exact match of normalised queries."""
    return normalize_sql(prediction) == normalize_sql(reference)


def synthetic_match(prediction: str, reference: str) -> bool:
    """Exact match after stripping surrounding whitespace."""
    return prediction.strip() == reference.strip()


def generic_match(prediction: str, reference: str) -> bool:
    """Exact match after whitespace normalisation."""
    return normalize_whitespace(prediction) == normalize_whitespace(reference)


METRICS: dict[str, Callable[[str, str], bool]] = {
    "gsm8k": gsm8k_match,
    "viggo": viggo_match,
    "sql": sql_match,
    "synthetic": synthetic_match,
    "generic": generic_match,
}


def get_metric(task: str) -> Callable[[str, str], bool]:
    """The match function of ``task`` (unknown tasks raise the registry's error)."""
    get_task(task)
    return METRICS[task]


def exact_match(task: str, predictions: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of predictions that match their reference under ``task``'s metric (0.0 for no examples)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    match = get_metric(task)
    return sum(match(p, r) for p, r in zip(predictions, references)) / len(references) if references else 0.0


# ------------------------------------------------------------------------------------------- generation


def max_new_tokens_for(task: str, requested: int | None = None) -> int:
    """The generation length: ``requested``, else the task's own default."""
    return requested or DEFAULT_MAX_NEW_TOKENS.get(task, 256)


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def _stop_ids(model: Any, tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
    if not ids:
        raise ValueError("no EOS token on the tokenizer or the model's generation config")
    return sorted(ids)


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    show_progress: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (text after the prompt, up to EOS, special tokens dropped).

    Prompts are tokenized as in training (``encode_prompt``), sorted by length so each batch
    pads little, left-padded by hand (the tokenizer's ``padding_side`` is left untouched) and generated
    in batches of ``batch_size``; results come back in the input order. The model's train/eval mode is
    restored afterwards.
    """
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: -len(encoded[i]))
    pad_id, device = pad_token_id(tokenizer), _model_device(model)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        eos_token_id=_stop_ids(model, tokenizer),
        pad_token_id=pad_id,
    )
    outputs: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        bar = tqdm(total=len(prompts), desc="generating", unit="ex", disable=not show_progress)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for row, i in enumerate(idx):
                n = len(encoded[i])
                ids[row, width - n :] = torch.tensor(encoded[i], dtype=torch.long)
                mask[row, width - n :] = 1
            out = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config
            )
            for row, i in enumerate(idx):
                outputs[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            bar.update(len(idx))
        bar.close()
    finally:
        model.train(was_training)
    return outputs


def evaluate_task(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    task: str,
    *,
    max_new_tokens: int | None = None,
    batch_size: int = 8,
    num_samples: int = 5,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Generate for every example and score it with ``task``'s metric.

    Returns ``{"task", "exact_match", "correct", "count", "max_new_tokens", "hits", "samples"}``; ``hits`` has
    one character per example, in order, "1" where it matched (two models scored on the same rows can be
    compared row by row; a string stays one line in a results file);
    ``samples`` holds the first ``num_samples`` examples as ``{"prompt", "reference", "prediction", "correct"}``.
    """
    max_new = max_new_tokens_for(task, max_new_tokens)
    predictions = generate_responses(
        model, tokenizer, [e.prompt for e in examples], max_new, batch_size, show_progress
    )
    return score_predictions(examples, predictions, task, max_new, num_samples)


def score_predictions(
    examples: Sequence[Example],
    predictions: Sequence[str],
    task: str,
    max_new_tokens: int | None = None,
    num_samples: int = 5,
) -> dict[str, Any]:
    """``evaluate_task``'s result for predictions made elsewhere (e.g. shares generated on several ranks)."""
    if len(predictions) != len(examples):
        raise ValueError(f"{len(predictions)} predictions for {len(examples)} examples")
    match = get_metric(task)
    hits = [bool(match(p, e.response)) for p, e in zip(predictions, examples)]
    return {
        "task": task,
        "exact_match": sum(hits) / len(hits) if hits else 0.0,
        "correct": sum(hits),
        "count": len(hits),
        "max_new_tokens": max_new_tokens_for(task, max_new_tokens),
        "hits": "".join("1" if h else "0" for h in hits),
        "samples": [
            {"prompt": e.prompt, "reference": e.response, "prediction": p, "correct": h}
            for e, p, h in list(zip(examples, predictions, hits))[:num_samples]
        ],
    }


def heldout_loss(model: Any, dataloader: Iterable[dict[str, torch.Tensor]]) -> float:
    """Mean cross-entropy per response token over the whole loader (token-weighted, not batch-weighted).

    Batches are ``CausalLMCollator`` outputs; tokens labelled -100 do not count. Returns ``nan`` if no
    token is labelled.
    """
    total, count = heldout_loss_sums(model, dataloader)
    return total / count if count else math.nan


def response_token_count(labels: torch.Tensor) -> int:
    """Tokens a causal LM is scored on: labelled positions after the first (the labels shift by one)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def summed_response_loss(model: Any, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Next-token cross-entropy summed (not averaged) over the response tokens of a ``CausalLMCollator`` batch,
    so that callers can normalise over micro-batches or ranks themselves."""
    labels = batch["labels"].to(device)
    logits = model(
        input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
    ).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(),
        labels[:, 1:].flatten(),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@torch.no_grad()
def heldout_loss_sums(model: Any, dataloader: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """(summed cross-entropy, number of response tokens): sums, so that shares scored on several ranks add up."""
    device = _model_device(model)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in dataloader:
            total += summed_response_loss(model, batch, device).item()
            count += response_token_count(batch["labels"])
    finally:
        model.train(was_training)
    return total, count


# ------------------------------------------------------------------------------------------- a run's scores


def evaluate_examples(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    task: str,
    run: Any,
    label: str,
    show_progress: bool = True,
    ctx: Any = None,
) -> dict[str, Any]:
    """Exact match and held-out loss of ``examples`` under ``run``'s eval settings; with several processes each
    scores a share and the results are merged."""
    from .. import distributed

    ctx = ctx or distributed.ProcessContext()
    mine = distributed.shard(list(examples), ctx)
    predictions = generate_responses(
        model,
        tokenizer,
        [e.prompt for e in mine],
        max_new_tokens=max_new_tokens_for(task, run.eval.max_new_tokens),
        batch_size=run.eval.batch_size,
        show_progress=show_progress,
    )
    total, count = _loss_sums(model, tokenizer, mine, run)
    predictions = [p for share in distributed.gather_objects(predictions, ctx) for p in share]
    total, count = distributed.all_reduce_sum([total, count], ctx)
    result = score_predictions(examples, predictions, task, run.eval.max_new_tokens)
    result["heldout_loss"] = total / count if count else math.nan
    result["label"] = label
    return result


def heldout_loss_of(job: Any, examples: Sequence[Example]) -> float:
    """The held-out loss of a training job's model on ``examples`` (split between the ranks)."""
    from .. import distributed

    mine = distributed.shard(list(examples), job.ctx)
    total, count = distributed.all_reduce_sum(
        list(_loss_sums(job.model, job.tokenizer, mine, job.run)), job.ctx
    )
    return total / count if count else math.nan


def _loss_sums(model: Any, tokenizer: Any, examples: Sequence[Example], run: Any) -> tuple[float, int]:
    from .batches import CausalLMCollator, tokenize_examples

    features = sorted(
        tokenize_examples(examples, tokenizer, run.data.max_length), key=lambda f: len(f["input_ids"])
    )
    collate, size = CausalLMCollator(tokenizer), run.eval.batch_size
    return heldout_loss_sums(model, [collate(features[i : i + size]) for i in range(0, len(features), size)])
