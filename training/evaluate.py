"""Held-out metrics of the example functions, with their adapter and on the bare backbone:
`python -m training.evaluate [--limit N] [--out FILE]`.

Each held-out event goes through the function's own prompt and post-processing, greedy, with
the function's default token budget. The metrics check what each function promises:

- sql: the answer starts with SELECT and SQLite parses it against `data/schema.sql`;
- summarize: one sentence of at most 25 words that names who or where the text is about;
- support: the reply states the FAQ answer word for word (or hands the question to a
  colleague when no entry applies) in at most four sentences.
"""

from __future__ import annotations

import argparse
import json
import re
import sqlite3
from pathlib import Path

from training import DATA
from training.data import read
from training.functions import messages, postprocess

MAX_NEW_TOKENS = {"sql": 64, "summarize": 48, "support": 64}
HANDOFF = "passed your question to a colleague"


def sql_ok(event: dict, reference: str, answer: str) -> bool:
    if not answer.lstrip().upper().startswith("SELECT"):
        return False
    db = sqlite3.connect(":memory:")
    try:
        db.executescript((DATA / "schema.sql").read_text())
        db.execute("EXPLAIN " + answer)
        return True
    except sqlite3.Error:
        return False
    finally:
        db.close()


def _sentences(text: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]


def summarize_ok(event: dict, reference: str, answer: str) -> bool:
    names = {w.strip(".,'s") for w in reference.split()[1:] + reference.split()[:1]
             if w[:1].isupper() and w not in ("The", "A")} & set(re.findall(r"\w+", event["text"]))
    return (len(_sentences(answer)) == 1 and len(answer.split()) <= 25
            and any(n in answer for n in names))


def support_ok(event: dict, reference: str, answer: str) -> bool:
    from training.functions import load

    support = load("support")
    facts = support.facts_for(event["message"], support.FAQ)
    grounded = all(f in answer for f in facts) if facts else HANDOFF in answer
    return grounded and 0 < len(_sentences(answer)) <= 4


METRICS = {"sql": sql_ok, "summarize": summarize_ok, "support": support_ok}


def generate(model, tokenizer, task: str, events: list[dict], batch_size: int = 8) -> list[str]:
    """The function's answers for `events` (greedy, its prompt and post-processing)."""
    import torch

    tokenizer.padding_side = "left"
    out: list[str] = []
    for i in range(0, len(events), batch_size):
        prompts = [tokenizer.apply_chat_template(messages(task, e), tokenize=False, add_generation_prompt=True)
                   for e in events[i:i + batch_size]]
        batch = tokenizer(prompts, return_tensors="pt", padding=True)
        with torch.no_grad():
            ids = model.generate(**batch, max_new_tokens=MAX_NEW_TOKENS[task], do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        width = batch["input_ids"].shape[1]
        out += [postprocess(task, tokenizer.decode(row[width:], skip_special_tokens=True)) for row in ids]
    return out


def evaluate(backbone: Path, adapters: Path, tasks: list[str], limit: int | None = None) -> dict:
    """{task: {"n", "adapter", "base", "adapter_exact", "base_exact", "examples"}}: the share
    of held-out events whose answer passes the task's metric (or equals the reference) with
    the adapter and on the bare backbone."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(backbone)
    results = {}
    for task in tasks:
        rows = read(task, "heldout")[:limit]
        events = [r["event"] for r in rows]
        base = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapters / task).eval()
        tuned = generate(model, tokenizer, task, events)
        with model.disable_adapter():
            bare = generate(model, tokenizer, task, events)
        score = METRICS[task]
        results[task] = {
            "n": len(rows),
            "adapter": sum(score(r["event"], r["answer"], a) for r, a in zip(rows, tuned)) / len(rows),
            "base": sum(score(r["event"], r["answer"], a) for r, a in zip(rows, bare)) / len(rows),
            # Stricter, for the record: the answer is the reference, character for character.
            "adapter_exact": sum(a == r["answer"] for r, a in zip(rows, tuned)) / len(rows),
            "base_exact": sum(a == r["answer"] for r, a in zip(rows, bare)) / len(rows),
            "examples": [{"event": r["event"], "adapter": a, "base": b}
                         for r, a, b in list(zip(rows, tuned, bare))[:3]],
        }
    return results


def main() -> None:
    from faas.bundled import SMOLLM2, models_dir
    from runtime.models.hf import quiet_transformers
    from runtime.models.smollm2 import ADAPTERS, ensure_smollm2
    from training.train import TASKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=None, help="held-out events per task (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    quiet_transformers()
    models_dir().mkdir(parents=True, exist_ok=True)
    if ensure_smollm2(models_dir()) is None:
        raise SystemExit("SmolLM2 is unavailable: see " + str(models_dir() / f"{SMOLLM2}.unavailable"))
    results = evaluate(models_dir() / SMOLLM2, ADAPTERS, list(TASKS), args.limit)
    text = json.dumps(results, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    for task, r in results.items():
        print(f"{task:10} held-out {r['n']:3}: with adapter {r['adapter']:.0%} ({r['adapter_exact']:.0%} exact), "
              f"bare backbone {r['base']:.0%} ({r['base_exact']:.0%} exact)")


if __name__ == "__main__":
    main()
