"""Cost of RoSA mask collection on SmolLM2-135M (CPU): time per micro-batch and peak memory, against a LoRA step.

Every adapted linear layer of the 30 decoder layers (q, k, v, o, gate, up, down: 106M weight entries) is a
RosaLinear with r=16, alpha=32, density 0.006 and no mask yet. One micro-batch is 4 sequences x 256 random
tokens. Variants, each run in its own subprocess:

- ``lora``: a LoRA training step (forward + backward + AdamW step), i.e. a RoSA warm-up step. One untimed
  step, then ``--steps`` timed ones.
- ``fwd_bwd``: a forward + backward pass with every parameter frozen and no hooks (the backward reaches every
  layer through an input embedding that requires grad): what a collection pass costs without the statistics,
  so ``collect - fwd_bwd`` isolates the accumulators, the inputs the hooks keep and the ``G`` matmuls.
- ``collect``: ``rosa.masks.collect_mask`` (fisher, one pass: fp32 accumulators for every layer at once) over
  ``--micro-batches`` micro-batches.
- ``collect_capped``: the same with ``mask_memory_budget=--budget`` GiB: layer groups, one pass each.
- ``collect_bf16``: one pass with bfloat16 accumulators.

Time: seconds per micro-batch pass (forward + backward + hooks, timed between consecutive loss_fn calls,
median), and the whole collection (passes + scoring + top-k + setting the supports).

Memory: peak resident set size (VmHWM). After the model is loaded, wrapped and every weight page touched
(the weights may be memory-mapped), the process resets its
high-water mark (``echo 5 > /proc/self/clear_refs``) and records its resident size; the reported ``extra`` is
the peak reached during the variant minus that baseline, so model loading does not count. Where clear_refs is
not available a 2 ms psutil sampling thread is used instead (noted in the JSON).

The machine is shared and noisy, so the variants are interleaved round by round (``--rounds``), medians are
reported, and time ratios are computed per round before taking the median.

    python benchmarks/masks.py                   # writes docs/benchmarks/masks.json and prints a table
    python benchmarks/masks.py --rounds 1 --micro-batches 2

The JSON records its provenance (benchmarks/provenance.py); ``markdown(results)`` renders the README's table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import provenance
from proc_memory import status_kib
from tables import markdown_row, markdown_table

GRANULARITY = "example"  # the statistic the published run timed (the default then), kept for reruns
ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("lora", "fwd_bwd", "collect", "collect_capped", "collect_bf16")


# --- inside a subprocess --------------------------------------------------------------------------------


class PeakRSS:
    """Peak resident memory from the moment ``start()`` is called."""

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.mode = "VmHWM after clear_refs"
            self._sampler = None
        except OSError:
            import psutil

            self.mode = "psutil sampling (2 ms)"
            self._proc = psutil.Process()
            self._peak = self._proc.memory_info().rss
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        self.baseline = status_kib("VmRSS") * 1024

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, self._proc.memory_info().rss)
            time.sleep(0.002)

    def peak(self) -> int:
        if self._sampler is None:
            return status_kib("VmHWM") * 1024
        self._stop.set()
        self._sampler.join()
        return self._peak


def load_model(rank: int, density: float):
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM

    from rosa.layer import RosaLinear

    try:
        from rosa.app.default_model import default_model_path

        path = default_model_path()
    except ImportError:  # pragma: no cover - before default_model existed
        path = None
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for p in model.parameters():
        p.requires_grad_(False)
    for parent in list(model.model.layers.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(
                    parent, name, RosaLinear(child, "default", r=rank, lora_alpha=2 * rank, density=density)
                )
    model.train()
    # Fault in every weight page now: from_pretrained may leave the weights memory-mapped, and pages touched
    # for the first time during the variant would otherwise count as its "extra" memory.
    with torch.no_grad():
        for tensor in (*model.parameters(), *model.buffers()):
            float(tensor.float().sum())
    return model


def run_variant(args: argparse.Namespace) -> dict:
    import gc

    import torch

    torch.set_num_threads(args.threads)
    from rosa.mask import accumulator_bytes, collect_mask, mask_layers, plan_layer_groups
    from rosa.mask.collect import FrozenParams

    model = load_model(args.rank, args.density)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    batches = []
    for _ in range(max(args.micro_batches, 1)):
        ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    layers = mask_layers(model)
    result: dict = {
        "variant": args.variant,
        "adapted_layers": len(layers),
        "adapted_weight_entries": sum(x.out_features * x.in_features for x in layers.values()),
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }
    gc.collect()
    meter = PeakRSS()
    meter.start()
    t_total = time.perf_counter()
    if args.variant == "lora":
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for i in range(args.steps + 1):
            t = time.perf_counter()
            model(**batches[0]).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i > 0:
                times.append(time.perf_counter() - t)
        result["step_s"] = statistics.median(times)
        result["step_times_s"] = times
    elif args.variant == "fwd_bwd":
        with FrozenParams(model):
            times = []
            for i in range(args.steps + 1):
                t = time.perf_counter()
                ids = batches[0]["input_ids"]
                embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
                model(inputs_embeds=embeds, labels=ids).loss.backward()
                del embeds
                if i > 0:
                    times.append(time.perf_counter() - t)
        result["step_s"] = statistics.median(times)
        result["step_times_s"] = times
    else:
        budget = args.budget if args.variant == "collect_capped" else None
        dtype = torch.bfloat16 if args.variant == "collect_bf16" else torch.float32
        stamps: list[float] = []

        def loss_fn(m, b):
            stamps.append(time.perf_counter())
            return m(**b).loss

        collect_mask(
            model, batches, loss_fn, method="fisher", memory_budget=budget, accumulator_dtype=dtype,
            fisher_granularity=GRANULARITY,
        )  # fmt: skip
        end = time.perf_counter()
        groups = plan_layer_groups(
            layers, budget, accumulator_dtype=dtype, per_example=GRANULARITY == "example"
        )
        n = len(batches)
        passes = []  # consecutive loss_fn calls inside one group
        for gi in range(len(groups)):
            s = stamps[gi * n : (gi + 1) * n]
            passes += [b - a for a, b in itertools.pairwise(s)]
        result["groups"] = len(groups)
        result["passes"] = len(stamps)
        result["micro_batch_s"] = statistics.median(passes) if passes else None
        result["collect_total_s"] = end - t_total
        result["accumulator_bytes_all_layers"] = accumulator_bytes(layers, accumulator_dtype=dtype)
        result["largest_group_accumulator_bytes"] = max(
            accumulator_bytes({k: layers[k] for k in grp}, accumulator_dtype=dtype) for grp in groups
        )
        result["memory_budget_gib"] = budget
    result["total_s"] = time.perf_counter() - t_total
    result["baseline_rss_bytes"] = meter.baseline
    result["peak_rss_bytes"] = meter.peak()
    result["extra_rss_bytes"] = result["peak_rss_bytes"] - meter.baseline
    result["memory_mode"] = meter.mode
    result["torch_threads"] = torch.get_num_threads()
    return result


# --- the driver -----------------------------------------------------------------------------------------


def _child(variant: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--variant",
        variant,
        "--threads",
        str(args.threads),
        "--micro-batches",
        str(args.micro_batches),
        "--steps",
        str(args.steps),
        "--budget",
        str(args.budget),
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--rank",
        str(args.rank),
        "--density",
        str(args.density),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"variant {variant} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}"


def _mib(x: float) -> float:
    return round(x / 2**20, 1)


# --- the README's table (python benchmarks/report.py) ---------------------------------------------------

JSON_KEYS = {"benchmark", "command", "provenance", "model", "setup", "machine", "summary", "runs"}


def markdown(results: dict) -> str:
    """The README's mask-collection section, from the JSON alone."""
    setup, summary = results["setup"], results["summary"]
    lora = summary["lora"]
    passes_all = summary["collect"]["passes"]
    labels = {
        "collect": "collection, all layers at once",
        "collect_capped": f"collection, `mask_memory_budget={setup['capped budget GiB']:g}` GiB "
        f"({summary['collect_capped']['groups']} layer groups, "
        f"{summary['collect_capped']['passes'] / passes_all:g}x the passes)",
        "collect_bf16": "collection, bf16 accumulators",
    }
    out = [
        f"**Mask collection** (`{results['command'].strip()}`, {results['model']}, r {setup['rank']}, density "
        f"{100 * setup['density']:g}%, {setup['micro_batch']} per micro-batch, "
        f"{setup['mask_steps (micro-batches)']} micro-batches, {setup['torch_threads']} torch thread(s), each "
        f"variant in its own process, medians over {setup['rounds']} interleaved rounds; "
        "`docs/benchmarks/masks.json`). Time per collection micro-batch and peak RSS growth, as ratios to a "
        "LoRA training step taken within each round; accumulators: the largest layer group's statistics.",
        "",
        provenance.describe(results, "benchmarks/masks.py"),
        "",
        *markdown_table(
            [
                "variant",
                "time per micro-batch vs a LoRA step",
                "extra peak RSS vs a LoRA step",
                "accumulators",
            ],
            [
                [
                    "LoRA training step",
                    f"1.00 ({lora['time_s']:.1f} s)",
                    f"1.00 ({lora['extra_rss_mib']:.0f} MiB)",
                    "-",
                ]
            ],
        ),
    ]
    for key, text in labels.items():
        row = summary[key]
        out.append(
            markdown_row(
                [
                    text,
                    f"{row['time_ratio_vs_lora_step']:.2f}",
                    f"{row['extra_rss_ratio_vs_lora_step']:.2f}",
                    f"{row['largest_group_accumulator_mib']:.1f} MiB",
                ]
            )
        )
    note = provenance.unknown_keys_note(results, JSON_KEYS, "python benchmarks/masks.py")
    if note:
        out += ["", note]
    return "\n".join(out) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--micro-batches", type=int, default=3, help="mask_steps M")
    parser.add_argument("--steps", type=int, default=2, help="timed LoRA steps")
    parser.add_argument(
        "--budget", type=float, default=0.15, help="mask_memory_budget (GiB) of collect_capped"
    )
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--density", type=float, default=0.006)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per subprocess")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "masks.json")
    args = parser.parse_args()

    if args.variant:
        print(json.dumps(run_variant(args)))
        return

    prov = provenance.provenance()
    runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for v in VARIANTS:
            res = _child(v, args)
            runs[v].append(res)
            print(
                f"round {r + 1}/{args.rounds} {v}: {json.dumps({k: res[k] for k in res if k.endswith('_s')})}",
                file=sys.stderr,
                flush=True,
            )

    def med(v, key):
        vals = [x[key] for x in runs[v] if x.get(key) is not None]
        return statistics.median(vals) if vals else None

    lora_s = [x["step_s"] for x in runs["lora"]]
    lora_extra = [x["extra_rss_bytes"] for x in runs["lora"]]
    summary = {}
    for v in VARIANTS:
        row = {
            "time_s": med(v, "step_s" if v in ("lora", "fwd_bwd") else "micro_batch_s"),
            "collect_total_s": med(v, "collect_total_s"),
            "extra_rss_mib": _mib(med(v, "extra_rss_bytes")),
            "peak_rss_mib": _mib(med(v, "peak_rss_bytes")),
            "baseline_rss_mib": _mib(med(v, "baseline_rss_bytes")),
        }
        key = "step_s" if v in ("lora", "fwd_bwd") else "micro_batch_s"
        row["time_ratio_vs_lora_step"] = round(
            statistics.median(x[key] / lora_s[i] for i, x in enumerate(runs[v])), 3
        )
        row["extra_rss_ratio_vs_lora_step"] = round(
            statistics.median(x["extra_rss_bytes"] / lora_extra[i] for i, x in enumerate(runs[v])), 3
        )
        if v.startswith("collect"):
            first = runs[v][0]
            row["groups"] = first["groups"]
            row["passes"] = first["passes"]
            row["accumulator_mib_all_layers"] = _mib(first["accumulator_bytes_all_layers"])
            row["largest_group_accumulator_mib"] = _mib(first["largest_group_accumulator_bytes"])
            row["collect_total_ratio_vs_lora_step"] = round(
                statistics.median(x["collect_total_s"] / lora_s[i] for i, x in enumerate(runs[v])), 3
            )
        summary[v] = row

    first = runs["lora"][0]
    report = {
        "benchmark": "rosa mask collection vs LoRA step",
        "command": " ".join(["python benchmarks/masks.py", *sys.argv[1:]]),
        "provenance": provenance.finish(prov),
        "model": "SmolLM2-135M-Instruct (rosa.default_model, fp32)",
        "setup": {
            "micro_batch": f"{args.batch} x {args.seq} tokens",
            "rank": args.rank,
            "density": args.density,
            "mask_steps (micro-batches)": args.micro_batches,
            "fisher_granularity": GRANULARITY,
            "capped budget GiB": args.budget,
            "adapted_layers": first["adapted_layers"],
            "adapted_weight_entries": first["adapted_weight_entries"],
            "trainable_params": first["trainable_params"],
            "torch_threads": first["torch_threads"],
            "rounds": args.rounds,
            "memory": first["memory_mode"] + "; extra = peak - resident size after loading the model",
        },
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "summary": summary,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")

    header = f"{'variant':<16}{'s/micro-batch':>14}{'x LoRA step':>12}{'collect s':>10}{'groups':>7}"
    header += f"{'acc MiB':>9}{'extra RSS MiB':>14}{'x LoRA':>8}"
    print(header)
    for v, row in summary.items():
        print(
            f"{v:<16}{row['time_s']:>14.2f}{row['time_ratio_vs_lora_step']:>12.2f}"
            f"{_fmt(row['collect_total_s']):>10}{row.get('groups', '-'):>7}"
            f"{row.get('largest_group_accumulator_mib', '-'):>9}{row['extra_rss_mib']:>14.1f}"
            f"{row['extra_rss_ratio_vs_lora_step']:>8.2f}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
