"""RoSA with transformers.Trainer: the sparse values in their own parameter group, the schedule as a callback.

python examples/trainer.py --steps 60
"""

from _common import load, parse_args, texts
from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

from rosa import RosaConfig, get_rosa_model
from rosa.optim import create_rosa_optimizer
from rosa.scheduler import RosaTrainerCallback

args = parse_args(__doc__)
model, tokenizer = load(args.model)
config = RosaConfig(r=16, lora_alpha=32, density=0.01, mask_steps=8, task_type="CAUSAL_LM")
model = get_rosa_model(model, config)
model.print_trainable_parameters()

dataset = Dataset.from_dict({"text": texts()}).map(
    lambda row: tokenizer(row["text"]), remove_columns=["text"]
)
optimizer = create_rosa_optimizer(model, lr=2e-3, sparse_lr_ratio=3.5)  # sparse values at lr / 3.5
trainer = Trainer(
    model=model,
    args=TrainingArguments(
        output_dir=f"{args.out}-trainer",
        max_steps=args.steps,
        per_device_train_batch_size=8,
        warmup_steps=max(1, args.steps // 10),  # also the sparse values' re-warm-up once the mask is fixed
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
    ),
    train_dataset=dataset,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    optimizers=(optimizer, None),  # Trainer builds its LR scheduler over these groups
    callbacks=[RosaTrainerCallback()],  # LoRA warm-up -> mask from 8 micro-batches -> joint training
)
trainer.train()
model.save_pretrained(args.out)
print(f"adapter saved to {args.out}")
