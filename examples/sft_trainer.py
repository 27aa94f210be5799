"""RoSA with TRL's SFTTrainer: the same callback and optimizer as with transformers.Trainer.

python examples/sft_trainer.py --steps 60
"""

from _common import load, parse_args, texts
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rosa import RosaConfig, get_rosa_model
from rosa.optim import create_rosa_optimizer
from rosa.scheduler import RosaTrainerCallback

args = parse_args(__doc__)
model, tokenizer = load(args.model)
model = get_rosa_model(
    model, RosaConfig(r=16, lora_alpha=32, density=0.01, mask_steps=8, task_type="CAUSAL_LM")
)

trainer = SFTTrainer(
    model=model,
    args=SFTConfig(
        output_dir=f"{args.out}-sft",
        max_steps=args.steps,
        per_device_train_batch_size=8,
        warmup_steps=max(1, args.steps // 10),
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=64,
    ),
    train_dataset=Dataset.from_dict({"text": texts()}),
    processing_class=tokenizer,
    optimizers=(create_rosa_optimizer(model, lr=2e-3, sparse_lr_ratio=3.5), None),
    callbacks=[RosaTrainerCallback()],
)
trainer.train()
model.save_pretrained(args.out)
print(f"adapter saved to {args.out}")
