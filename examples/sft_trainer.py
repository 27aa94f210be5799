"""RoSA with TRL's SFTTrainer, the ordinary PEFT recipe: pass a RosaConfig as peft_config, nothing else.

The model drives RoSA's schedule itself (LoRA warm-up, mask from 8 micro-batches, restart, re-warm-up, the sparse
values at lr / sparse_lr_ratio) through torch's optimizer-step hooks, with the optimizer SFTTrainer builds.

python examples/sft_trainer.py --steps 60
"""

from _common import load, parse_args, texts
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from rosa import RosaConfig

args = parse_args(__doc__)
model, tokenizer = load(args.model)

trainer = SFTTrainer(
    model=model,
    args=SFTConfig(
        output_dir=f"{args.out}-sft",
        max_steps=args.steps,
        per_device_train_batch_size=8,
        learning_rate=2e-3,
        # SFTTrainer does not tell rosa this: the re-warm-up after the mask lasts as many steps as fixing it took
        warmup_steps=max(1, args.steps // 10),
        logging_steps=10,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=64,
    ),
    train_dataset=Dataset.from_dict({"text": texts()}),
    processing_class=tokenizer,
    peft_config=RosaConfig(r=16, lora_alpha=32, density=0.01, mask_steps=8, task_type="CAUSAL_LM"),
)
trainer.train()
trainer.model.save_pretrained(args.out)
print(f"adapter saved to {args.out}")
