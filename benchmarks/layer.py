#!/usr/bin/env python
"""One adapted linear layer, forward + backward: RoSA (r 16 + 1%) against PEFT LoRA (r 16), side by side.

For each shape (out x in), token count and dtype, both layers wrap the same frozen random weight; the input
needs a gradient (as inside a model) and the loss is ``y.float().pow(2).mean()``. RoSA's support is uniform
random at 1% and its values non-zero; ``sparse_strategy="auto"`` (what a user gets) picks spmm or fold, and the
choice is recorded. Within a row the two layers run in ``--rounds`` interleaved rounds after one untimed step
each; the ratio RoSA / LoRA is taken per round and its median reported, with the range over rounds.

Where RoSA's extra time goes: in the same row, and interleaved the same way, one dense GEMM of the shape
(``x @ W^T``, the unit of the ratios) and each sparse op the chosen strategy runs, alone, through the ``rosa::``
ops with the layer's own arguments: for spmm the forward ``spmm``, the input gradient ``spmm_t`` and the value
gradient ``sddmm``; for fold, ``fold`` (twice a step: forward and backward; its matmuls replace the base's) and
``sddmm`` (see ``_op_calls`` for dtypes and layouts).

Goal (issues 16 and 29): RoSA <= 1.10x LoRA in every row, fp32 and bf16. The JSON records its provenance; ``markdown(results)``
renders the README section (``python benchmarks/report.py``).

    python benchmarks/layer.py                     # every row -> docs/benchmarks/layer.json
    python benchmarks/layer.py --quick             # 4096x4096, 512 tokens; writes nothing unless --out
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import provenance
import torch
from tables import markdown_row, markdown_table
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "benchmarks" / "layer.json"
SHAPES = [(4096, 4096), (11008, 4096)]  # (out, in): LLaMA-7B attention and MLP up/gate
TOKENS = [512, 2048]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANK, DENSITY = 16, 0.01
TARGET = 1.10  # RoSA layer step <= 1.10x LoRA's
KERNELS = {"cpu": "rosa's own (compiled)", "cpu-mkl": "PyTorch's MKL"}
OPS = {  # what each strategy adds to the base layer's own two matmuls, op by op (fold runs twice a step)
    "spmm": ("spmm", "spmm_t", "sddmm"),
    "fold": ("fold", "fold", "sddmm"),
}


class _One(nn.Module):
    def __init__(self, out_features: int, in_features: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.proj = nn.Linear(in_features, out_features, bias=False, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def build(method: str, out_features: int, in_features: int, dtype: torch.dtype) -> nn.Module:
    """A wrapped one-layer model with the same frozen weight (seed 0) for both methods."""
    torch.manual_seed(0)
    model = _One(out_features, in_features, dtype)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["proj"]))
        layer = model.base_model.model.proj
        nn.init.normal_(layer.lora_B["default"].weight)  # non-zero B: the gradient of A is computed for real
        return model
    from rosa import RosaConfig, get_rosa_model
    from rosa.sparse import support_from_flat_index

    config = RosaConfig(r=RANK, lora_alpha=2 * RANK, density=DENSITY, target_modules=["proj"])
    model = get_rosa_model(model, config)
    layer = model.base_model.model.proj
    nnz = layer.capacity["default"]
    gen = torch.Generator().manual_seed(1)
    flat = torch.randperm(out_features * in_features, generator=gen)[:nnz]
    layer.set_support("default", support_from_flat_index(flat, (out_features, in_features)))
    with torch.no_grad():
        layer.rosa_values["default"].normal_(generator=gen)
        nn.init.normal_(layer.rosa_B["default"].weight)
    return model


def _step(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad(set_to_none=True)
    x.grad = None
    model(x).float().pow(2).mean().backward()


def _op_calls(model: nn.Module, x: torch.Tensor, strategy: str) -> dict:
    """One dense GEMM of the shape, and the sparse ops the layer's strategy runs, with the arguments
    RosaLinear gives them: spmm gets the layer's fp32 copy of x and an fp32 dy, row-major as autograd hands it
    over to rosa's own kernels (feature-major on MKL's: the backward's one shared transposing copy, not timed
    here); fold adds S into a copy of the weight and its SDDMM gets dy as autograd hands it over (row-major, in
    the weight's dtype)."""
    from rosa.sparse import ops, torch_ops

    layer = model.base_model.model.proj
    delta = layer.sparse("default")
    s, values = delta.support, delta.active_values().detach()
    xs = x.detach().float() if x.dtype != torch.float32 else x.detach()  # the layer's fp32 LoRA input
    weight = layer.base_layer.weight
    calls = {"gemm": lambda: x.detach() @ weight.t()}
    if strategy == "fold":
        flat = s.flat_index()
        dy = torch.randn(x.shape[0], layer.out_features, dtype=weight.dtype)
        calls["fold"] = lambda: ops.fold(weight, values, flat)
    else:
        dy = torch.randn(x.shape[0], layer.out_features, dtype=xs.dtype)
        if ops.backend_for(x.device) is torch_ops:
            dy = dy.t().contiguous().t()
        calls["spmm"] = lambda: ops.spmm(xs, values, s.row_offsets, s.col_idx, layer.out_features)
        calls["spmm_t"] = lambda: ops.spmm_t(
            dy, values, s.t_row_offsets, s.t_col_idx, s.t_perm, layer.in_features
        )
    calls["sddmm"] = lambda: ops.sddmm(dy, xs, s.row_offsets, s.col_idx)
    return calls


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def measure(out_features: int, in_features: int, tokens: int, dtype: str, rounds: int) -> dict:
    torch_dtype = DTYPES[dtype]
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(tokens, in_features, generator=gen).to(torch_dtype).requires_grad_(True)
    lora, rosa = (
        build("lora", out_features, in_features, torch_dtype),
        build("rosa", out_features, in_features, torch_dtype),
    )
    layer = rosa.base_model.model.proj
    strategy = layer.sparse("default").strategy(layer.sparse_strategy["default"], tokens, x.device)
    sparse = _op_calls(rosa, x, strategy)
    calls = {"lora": lambda: _step(lora, x), "rosa": lambda: _step(rosa, x), **sparse}
    for fn in calls.values():
        fn()  # untimed
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        with torch.no_grad():
            for name in sparse:
                times[name].append(_timed(calls[name]))
        for name in ("lora", "rosa"):
            times[name].append(_timed(calls[name]))
    ratios = [r / lo for r, lo in zip(times["rosa"], times["lora"])]
    added = [sum(times[op][i] for op in OPS[strategy]) for i in range(rounds)]
    median = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = statistics.median(ratios)
    return {
        "out": out_features,
        "in": in_features,
        "tokens": tokens,
        "dtype": dtype,
        "strategy": strategy,
        "nnz": layer.nnz("default"),
        "seconds": median,
        "rosa_over_lora": ratio,
        "rosa_over_lora_rounds": ratios,
        "extra_over_gemm": (median["rosa"] - median["lora"]) / median["gemm"],
        "sparse_ops": list(OPS[strategy]),
        "sparse_ops_over_gemm": statistics.median([t / g for t, g in zip(added, times["gemm"])]),
        "met": ratio <= TARGET,
    }


def _added(r: dict) -> str:
    """What RoSA adds in a row, op by op, in GEMMs of the shape: 'spmm 0.14 + spmm_t 0.22 + sddmm 0.25'."""
    s, names = r["seconds"], r["sparse_ops"]
    parts = [
        f"{'2 x ' if names.count(op) == 2 else ''}{op} {s[op] / s['gemm']:.2f}" for op in dict.fromkeys(names)
    ]
    return " + ".join(parts)


def markdown(results: dict) -> str:
    """The README's layer section, every number and verdict computed from the JSON."""
    rows, settings = results["rows"], results["settings"]
    out = [
        f"**One layer, forward + backward** (`{results['provenance']['command']}`; `docs/benchmarks/layer.json`): "
        f"RoSA r {settings['rank']} + {100 * settings['density']:g}% (random support, "
        f'`sparse_strategy="auto"`) against PEFT LoRA r {settings["rank"]} on the same frozen weight, '
        f"median of {settings['rounds']} interleaved rounds"
        + (
            f" ({settings['bf16_rounds']} for bf16 rows)"
            if settings.get("bf16_rounds", settings["rounds"]) != settings["rounds"]
            else ""
        )
        + (
            f", bf16 rows at {', '.join(map(str, settings['bf16_tokens']))} tokens"
            if settings.get("bf16_tokens") and {r["tokens"] for r in rows} - set(settings["bf16_tokens"])
            else ""
        )
        + f", {settings['threads']} thread(s), sparse kernels: "
        f"{KERNELS[settings.get('sparse_kernels', 'cpu-mkl')]}; goal RoSA <= "
        f"{results['target']:.2f}x LoRA. The last two columns time the sparse ops the chosen strategy adds to the "
        "base layer's two matmuls, each alone with the layer's own arguments, in units of one dense GEMM of the "
        "shape.",
        "",
        provenance.describe(results, "benchmarks/layer.py"),
        "",
        *markdown_table(
            [
                "out x in",
                "tokens",
                "dtype",
                "auto picks",
                "LoRA s",
                "RoSA s",
                "RoSA / LoRA (range)",
                "goal",
                "what RoSA adds, per op (GEMMs)",
                "in all (GEMMs)",
            ]
        ),
    ]
    for r in rows:
        s = r["seconds"]
        lo, hi = min(r["rosa_over_lora_rounds"]), max(r["rosa_over_lora_rounds"])
        out.append(
            markdown_row(
                [
                    f"{r['out']}x{r['in']}",
                    r["tokens"],
                    r["dtype"],
                    r["strategy"],
                    f"{s['lora']:.3f}",
                    f"{s['rosa']:.3f}",
                    f"{r['rosa_over_lora']:.2f}x ({lo:.2f}-{hi:.2f})",
                    "met" if r["met"] else "**not met**",
                    _added(r),
                    f"{r['sparse_ops_over_gemm']:.2f}",
                ]
            )
        )
    met = sum(r["met"] for r in rows)
    out += ["", f"Goal met on {met} of {len(rows)} rows."]
    missed = [r for r in rows if not r["met"]]
    if missed:
        worst = max(missed, key=lambda r: r["rosa_over_lora"])
        lora_gemms = worst["seconds"]["lora"] / worst["seconds"]["gemm"]
        out.append(
            f" The worst row ({worst['out']}x{worst['in']}, {worst['tokens']} tokens, {worst['dtype']}) spends "
            f"{worst['extra_over_gemm']:.2f} GEMMs more than LoRA per step, where the goal allows "
            f"{(results['target'] - 1) * lora_gemms:.2f} (LoRA's step takes {lora_gemms:.2f} GEMMs); its sparse "
            f"ops alone take {worst['sparse_ops_over_gemm']:.2f} GEMMs."
        )
        pairs = [
            (a, b)
            for a in rows
            for b in rows
            if (a["out"], a["in"], a["tokens"], a["dtype"], b["dtype"])
            == (b["out"], b["in"], b["tokens"], "fp32", "bf16")
        ]
        if pairs:
            gemm = statistics.median(b["seconds"]["gemm"] / a["seconds"]["gemm"] for a, b in pairs)
            sparse = statistics.median(
                sum(b["seconds"][op] for op in b["sparse_ops"])
                / sum(a["seconds"][op] for op in a["sparse_ops"])
                for a, b in pairs
            )
            out.append(
                f" In bf16 the dense GEMM takes {gemm:.2f}x its fp32 time (median over the shapes) and the "
                f"sparse ops {sparse:.2f}x theirs: in a bf16 layer they read the fp32 copy of x the LoRA branch "
                "makes and accumulate in fp32, so their work does not shrink with the dtype."
            )
    return "\n".join(out).replace("\n ", " ") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--bf16-rounds",
        type=int,
        default=None,
        help="rounds of a bf16 row (default: --rounds; a CPU without bf16 instructions makes them the slow rows)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--bf16-tokens",
        default=None,
        help="comma-separated token counts of the bf16 rows (default: those of the fp32 rows)",
    )
    parser.add_argument("--quick", action="store_true", help="4096x4096 at 512 tokens only")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--report", action="store_true", help="print the README section from the JSON")
    args = parser.parse_args(argv)
    out = args.out or (None if args.quick else OUT)
    if args.report:
        print(markdown(json.loads((out or OUT).read_text())))
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
    from rosa.sparse.strategy import cpu_kernels

    prov = provenance.provenance()
    shapes, tokens = (SHAPES[:1], TOKENS[:1]) if args.quick else (SHAPES, TOKENS)
    bf16_tokens = [int(n) for n in args.bf16_tokens.split(",")] if args.bf16_tokens else tokens
    rows = []
    for out_features, in_features in shapes:
        for n in tokens:
            for dtype in DTYPES:
                if dtype == "bf16" and args.bf16_tokens and n not in bf16_tokens:
                    continue
                rounds = args.rounds if dtype == "fp32" else (args.bf16_rounds or args.rounds)
                row = measure(out_features, in_features, n, dtype, rounds)
                rows.append(row)
                print(
                    f"{out_features}x{in_features} {n:5d} {dtype}: RoSA/LoRA {row['rosa_over_lora']:.2f}x "
                    f"({row['strategy']}), sparse ops {row['sparse_ops_over_gemm']:.2f} GEMM",
                    flush=True,
                )
    results = {
        "benchmark": "one layer forward + backward: RoSA vs PEFT LoRA",
        "command": prov["command"],
        "provenance": provenance.finish(prov),
        "settings": {
            "rank": RANK,
            "density": DENSITY,
            "rounds": args.rounds,
            "bf16_rounds": args.bf16_rounds or args.rounds,
            "bf16_tokens": bf16_tokens,
            "threads": torch.get_num_threads(),
            "sparse_kernels": cpu_kernels(),
        },
        "target": TARGET,
        "rows": rows,
    }
    print(markdown(results))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
