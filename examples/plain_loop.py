"""RoSA in a plain PyTorch loop: call the schedule after every optimizer step.

python examples/plain_loop.py --steps 60
"""

import torch
from _common import load, parse_args, texts

from rosa import RosaConfig, get_rosa_model
from rosa.optim import create_rosa_optimizer
from rosa.scheduler import RosaScheduler

args = parse_args(__doc__)
model, tokenizer = load(args.model)
model = get_rosa_model(
    model, RosaConfig(r=16, lora_alpha=32, density=0.01, mask_steps=8, task_type="CAUSAL_LM")
)

warmup = max(1, args.steps // 10)
optimizer = create_rosa_optimizer(model, lr=2e-3, sparse_lr_ratio=3.5)
lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
schedule = RosaScheduler(model, optimizer=optimizer, rewarmup_steps=warmup)  # config from the model

data = texts()
model.train()
for step in range(args.steps):
    rows = [data[(step * 8 + i) % len(data)] for i in range(8)]
    batch = tokenizer(rows, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    loss = model(**batch, labels=labels).loss
    loss.backward()
    optimizer.step()
    lr_schedule.step()
    optimizer.zero_grad()
    schedule.step(optimizer)  # warm-up -> mask collection -> mask fixed (restart, re-warm-up) -> joint
    if step % 10 == 0:
        print(f"step {step:3d}  loss {loss.item():.3f}  phase {schedule.phase}")
schedule.close()
model.save_pretrained(args.out)
print(f"adapter saved to {args.out}; schedule events: {[e['event'] for e in schedule.events]}")
