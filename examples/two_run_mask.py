"""The paper's two-run recipe: run 1 scores the mask (after a short LoRA warm-up) and saves it; run 2 starts a
fresh adapter from that mask, so A, B and the sparse values all begin at step 0 under the LR warm-up.

    python examples/two_run_mask.py --steps 60
The same from the command line: `rosa mask --out mask.safetensors` then `rosa train train.mask_path=mask.safetensors`.
"""

import torch
from _common import load, parse_args, texts

from rosa import RosaConfig, get_rosa_model
from rosa.optim import create_rosa_optimizer
from rosa.scheduler import RosaScheduler

args = parse_args(__doc__)
config = {"r": 16, "lora_alpha": 32, "density": 0.01, "task_type": "CAUSAL_LM"}
data = texts()


def batch(step: int):
    rows = [data[(step * 8 + i) % len(data)] for i in range(8)]
    encoded = tokenizer(rows, return_tensors="pt", padding=True)
    return {**encoded, "labels": encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)}


def train(model, steps: int, schedule: RosaScheduler) -> None:
    optimizer = create_rosa_optimizer(model, lr=2e-3, sparse_lr_ratio=3.5)
    warmup = max(1, steps // 10)
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    model.train()
    for step in range(steps):
        model(**batch(step)).loss.backward()
        optimizer.step()
        lr_schedule.step()
        optimizer.zero_grad()
        schedule.step(optimizer)
        if schedule.mask_ready and schedule.events[-1]["event"] == "mask_fixed":
            return  # run 1 stops here: the mask is all it was for


# run 1: LoRA warm-up, then fisher statistics over 8 micro-batches; the mask is saved when fixed
model, tokenizer = load(args.model)
first = get_rosa_model(model, RosaConfig(**config, warmup_steps=max(1, args.steps // 10), mask_steps=8))
train(first, args.steps, RosaScheduler(first, save_mask_path=f"{args.out}-mask.safetensors"))

# run 2: a fresh model and adapter, started from the saved mask
model, _ = load(args.model)
second = get_rosa_model(model, RosaConfig(**config))
train(second, args.steps, RosaScheduler(second, mask_path=f"{args.out}-mask.safetensors"))
second.save_pretrained(args.out)
print(f"mask {args.out}-mask.safetensors, adapter {args.out}")
