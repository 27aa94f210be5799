"""Size of a saved RoSA adapter file against PEFT LoRA (and SHiRA) files on SmolLM2-135M.

The target (issue 4): a RoSA ``adapter_model.safetensors`` is at most 1.5x the size of a PEFT LoRA file with the
same number of trainable parameters.

Setup: every linear layer of the 30 decoder blocks (q, k, v, o, gate, up, down; ``target_modules="all-linear"``,
the tied output head excluded) of the default offline model, SmolLM2-135M-Instruct (``rosa.app.default_model``).

- ``rosa``: RoSA r=16, density 0.6%, fp32 adapter, with a full mask set (magnitude top-k of each base weight:
  every layer's support holds its whole budget of nonzeros, the largest file a mask can give). The file holds
  A, B, the sparse values, and the CSR support (int32 row offsets, int16 column indices).
- ``lora_matched``: PEFT LoRA, fp32, with the integer rank whose trainable-parameter count is closest to RoSA's.
- ``lora_r16``: PEFT LoRA r=16 (RoSA's own low-rank part alone).
- ``shira_matched``: PEFT SHiRA (random mask) at the matched rank's parameter count: PEFT's other sparse adapter,
  which stores every nonzero as fp32 value + int32 (row, column) COO pair, 12 bytes per trainable parameter.

Reported per file: trainable parameters, bytes on disk, bytes per trainable parameter, and the ratio to the
matched LoRA file both as is and per trainable parameter (the two counts differ by under one rank's worth).

    python benchmarks/adapter_size.py    # writes docs/benchmarks/adapter_size.json and prints a table

The JSON records its provenance (benchmarks/provenance.py); ``markdown(results)`` renders the README's table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import provenance
import torch
from tables import markdown_row, markdown_table

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks" / "adapter_size.json"
RANK, DENSITY, TARGET_RATIO = 16, 0.006, 1.5


def load_base():
    """SmolLM2-135M as a plain fp32 LlamaForCausalLM, offline."""
    from transformers import AutoModelForCausalLM

    from rosa.app.default_model import default_model_path

    return AutoModelForCausalLM.from_pretrained(default_model_path(), dtype=torch.float32).eval()


def count_trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def file_bytes(folder: Path) -> int:
    return (folder / "adapter_model.safetensors").stat().st_size


def set_magnitude_masks(model) -> dict:
    """Each layer's support: the top-``capacity`` entries of |W0| (ties broken by position)."""
    import rosa
    from rosa.sparse import support_from_flat_index

    nnz = {"layers": 0, "nonzeros": 0, "int16_columns": True}
    for layer in rosa.rosa_layers(model).values():
        capacity = layer.capacity["default"]
        weight = layer.base_weight().detach().abs().float().reshape(-1)
        flat = torch.topk(weight, capacity, sorted=False).indices
        layer.set_support("default", support_from_flat_index(flat, (layer.out_features, layer.in_features)))
        with torch.no_grad():
            layer.rosa_values["default"].normal_(std=1e-3, generator=torch.Generator().manual_seed(0))
        nnz["layers"] += 1
        nnz["nonzeros"] += capacity
        nnz["int16_columns"] &= layer.in_features <= torch.iinfo(torch.int16).max + 1
    return nnz


def measure(name: str, description: str, model, folder: Path) -> dict:
    model.save_pretrained(folder)
    trainable = count_trainable(model)
    size = file_bytes(folder)
    return {
        "name": name,
        "config": description,
        "trainable_params": trainable,
        "file_bytes": size,
        "bytes_per_param": size / trainable,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-shira", action="store_true", help="skip PEFT SHiRA")
    args = parser.parse_args(argv)

    import peft
    from peft import LoraConfig, get_peft_model

    import rosa
    from rosa import RosaConfig

    prov = provenance.provenance(None if argv is None else [sys.argv[0], *argv])
    start = time.time()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        model = rosa.get_rosa_model(load_base(), RosaConfig(r=RANK, lora_alpha=2 * RANK, density=DENSITY))
        mask = set_magnitude_masks(model)
        counts = rosa.sparse_parameter_count(model)
        assert counts["sparse_active"] == counts["sparse_capacity"] == mask["nonzeros"]
        rows.append(
            measure("rosa", f"RoSA r={RANK}, density {DENSITY:.1%}, full magnitude mask", model, tmp / "rosa")
        )
        rosa_params = rows[-1]["trainable_params"]
        # sum over adapted layers of (in + out): the trainable parameters LoRA has per unit of rank
        per_rank = sum(layer.in_features + layer.out_features for layer in rosa.rosa_layers(model).values())
        n_layers = len(rosa.rosa_layers(model))
        del model

        candidates = sorted({max(1, int(rosa_params / per_rank)), int(rosa_params / per_rank) + 1})
        matched_rank = min(candidates, key=lambda r: abs(r * per_rank - rosa_params))
        for name, rank in (("lora_matched", matched_rank), ("lora_r16", RANK)):
            lora = get_peft_model(
                load_base(), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear")
            )
            rows.append(measure(name, f"PEFT LoRA r={rank}", lora, tmp / name))
            assert rows[-1]["trainable_params"] == rank * per_rank
            del lora

        if not args.no_shira:
            try:
                from peft import ShiraConfig

                shira_config = ShiraConfig(r=matched_rank, target_modules="all-linear", random_seed=0)
                shira = get_peft_model(load_base(), shira_config)
                rows.append(
                    measure(
                        "shira_matched", f"PEFT SHiRA r={matched_rank} (random mask)", shira, tmp / "shira"
                    )
                )
                del shira
            except Exception as e:  # SHiRA is optional context, not the target
                print(f"SHiRA skipped: {type(e).__name__}: {e}", file=sys.stderr)

    lora_matched = next(r for r in rows if r["name"] == "lora_matched")
    for row in rows:
        row["ratio_to_lora_matched"] = row["file_bytes"] / lora_matched["file_bytes"]
        row["ratio_per_param_to_lora_matched"] = row["bytes_per_param"] / lora_matched["bytes_per_param"]
    rosa_row = rows[0]
    result = {
        "benchmark": "adapter_size",
        "model": "SmolLM2-135M-Instruct (rosa.default_model), fp32",
        "adapted_layers": n_layers,
        "rosa": {"r": RANK, "density": DENSITY, "mask": "magnitude top-k, full capacity", **mask},
        "matched_lora_rank": matched_rank,
        "target": f"RoSA file <= {TARGET_RATIO}x the LoRA file with the same trainable parameters",
        "target_ratio": TARGET_RATIO,
        "target_met": rosa_row["ratio_per_param_to_lora_matched"] <= TARGET_RATIO
        and rosa_row["ratio_to_lora_matched"] <= TARGET_RATIO,
        "notes": {
            "rosa": "fp32 A, B and values (values at full capacity) + int32 row offsets (out+1 per layer) + int16 "
            "column indices (one per nonzero); the transposed CSR is rebuilt at load",
            "shira_matched": "fp32 values + int32 COO (row, col) indices per nonzero",
        },
        "rows": rows,
        "versions": {
            "torch": torch.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "seconds": round(time.time() - start, 1),
        "command": provenance.command_line(None if argv is None else [sys.argv[0], *argv]),
        "provenance": provenance.finish(prov),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print_table(result)
    print(f"\nwritten {args.out.relative_to(ROOT) if args.out.is_relative_to(ROOT) else args.out}")
    return result


# --- the README's table (python benchmarks/report.py) ---------------------------------------------------

JSON_KEYS = {
    "benchmark",
    "model",
    "adapted_layers",
    "rosa",
    "matched_lora_rank",
    "target",
    "target_ratio",
    "target_met",
    "notes",
    "rows",
    "versions",
    "seconds",
    "command",
    "provenance",
}
_NAMES = {
    "rosa": "RoSA r {r} + density {density:.1%} (full mask)",
    "lora_matched": "PEFT LoRA r {rank} (matched count)",
    "lora_r16": "PEFT LoRA r {r} (RoSA's low-rank part alone)",
    "shira_matched": "PEFT SHiRA (matched count)",
}


def markdown(results: dict) -> str:
    """The README's adapter-file section, from the JSON alone (the target verdict is computed here)."""
    target = results.get("target_ratio", TARGET_RATIO)
    rosa_cfg = results["rosa"]
    fields = {"r": rosa_cfg["r"], "density": rosa_cfg["density"], "rank": results["matched_lora_rank"]}
    out = [
        f"**Adapter files** (`{results['command']}`, {results['model']}, all {results['adapted_layers']} "
        "linear layers of the decoder; `docs/benchmarks/adapter_size.json`): `adapter_model.safetensors` as "
        "saved, against PEFT adapters with the closest trainable-parameter count.",
        "",
        provenance.describe(results, "benchmarks/adapter_size.py"),
        "",
        *markdown_table(
            ["adapter", "trainable params", "file", "bytes / param", "per param vs matched LoRA"]
        ),
    ]
    for row in results["rows"]:
        name = _NAMES.get(row["name"], row["config"]).format(**fields)
        ratio, per_param = row["ratio_to_lora_matched"], row["ratio_per_param_to_lora_matched"]
        verdict = ""
        if row["name"] == "rosa":
            met = ratio <= target and per_param <= target
            verdict = f" (file {ratio:.2f}x; target <= {target:g}x: {'met' if met else '**not met**'})"
        out.append(
            markdown_row(
                [
                    name,
                    f"{row['trainable_params']:,}",
                    f"{row['file_bytes'] / 1e6:.1f} MB",
                    f"{row['bytes_per_param']:.2f}",
                    f"{per_param:.2f}x{verdict}",
                ]
            )
        )
    note = provenance.unknown_keys_note(results, JSON_KEYS, "python benchmarks/adapter_size.py")
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


def print_table(result: dict) -> None:
    header = f"{'adapter':<14} {'config':<44} {'trainable':>11} {'file bytes':>12} {'B/param':>8} {'x LoRA':>7} {'x/param':>8}"
    print(header)
    print("-" * len(header))
    for r in result["rows"]:
        print(
            f"{r['name']:<14} {r['config']:<44} {r['trainable_params']:>11,} {r['file_bytes']:>12,} "
            f"{r['bytes_per_param']:>8.3f} {r['ratio_to_lora_matched']:>7.3f} {r['ratio_per_param_to_lora_matched']:>8.3f}"
        )
    print(f"\n{result['target']}: {'met' if result['target_met'] else 'NOT met'}")


if __name__ == "__main__":
    main()
