"""QRoSA: a 4-bit (bitsandbytes NF4, double quantization) frozen base with RoSA on top; runs on CPU too.

python examples/qrosa.py --steps 30
"""

import torch
from _common import load, parse_args, texts
from peft import prepare_model_for_kbit_training
from transformers import BitsAndBytesConfig

from rosa import RosaConfig, get_rosa_model
from rosa.optim import create_rosa_optimizer
from rosa.scheduler import RosaScheduler

args = parse_args(__doc__)
nf4 = BitsAndBytesConfig(
    load_in_4bit=True,
    bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True,
    bnb_4bit_compute_dtype=torch.bfloat16,
)
model, tokenizer = load(args.model, quantization_config=nf4)
model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
model = get_rosa_model(
    model, RosaConfig(r=16, lora_alpha=32, density=0.01, mask_steps=4, task_type="CAUSAL_LM")
)
optimizer = create_rosa_optimizer(model, lr=2e-3, sparse_lr_ratio=3.5)
schedule = RosaScheduler(model, optimizer=optimizer)

data = texts()
model.train()
for step in range(args.steps):
    batch = tokenizer([data[(step * 4 + i) % len(data)] for i in range(4)], return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model(**batch, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    schedule.step(optimizer)
schedule.close()
model.save_pretrained(args.out)  # the adapter only: the 4-bit base is reloaded from the model id
print(f"adapter saved to {args.out}; phase {schedule.phase}")
