"""Trains the example functions' LoRA adapters on the bundled SmolLM2, on CPU:
`python -m training.train [sql summarize support]` (about 6 minutes each on 2 cores).

Each example is the function's own chat prompt (`ctx.chat_prompt(messages_for(event))`,
encoded as the runtime encodes it) followed by the answer and `<|im_end|>`; the loss counts
the answer tokens only. Rank 8 on q_proj and v_proj, fixed seed, fp32. Writes
`runtime/models/adapters/<task>/`, which the runtime ships and copies beside the model.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from pathlib import Path

from runtime.models.smollm2 import ADAPTERS
from runtime.proc.children import open_to_others
from training.data import read
from training.functions import messages

TASKS = ("sql", "summarize", "support")
SEED = 1234
RANK, ALPHA, TARGETS = 8, 16, ["q_proj", "v_proj"]
BASE_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def encode(tokenizer, task: str, example: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) for one example: labels are -100 over the prompt."""
    prompt = tokenizer.apply_chat_template(messages(task, example["event"]), tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer(prompt)["input_ids"]
    answer_ids = tokenizer(example["answer"] + tokenizer.eos_token, add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def train(backbone: Path, task: str, out: Path, epochs: int = 2, batch_size: int = 8,
          lr: float = 1e-3) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    random.seed(SEED)
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = AutoModelForCausalLM.from_pretrained(backbone, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0,
                                             target_modules=TARGETS, task_type="CAUSAL_LM"))
    examples = [encode(tokenizer, task, e) for e in read(task, "train")]
    steps = epochs * math.ceil(len(examples) / batch_size)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 - s / steps)
    pad = tokenizer.pad_token_id
    model.train()
    rng, step, started, losses = random.Random(SEED), 0, time.monotonic(), []
    for epoch in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for i in range(0, len(order), batch_size):
            batch = [examples[j] for j in order[i:i + batch_size]]
            width = max(len(ids) for ids, _ in batch)
            ids = torch.tensor([x + [pad] * (width - len(x)) for x, _ in batch])
            labels = torch.tensor([y + [-100] * (width - len(y)) for _, y in batch])
            mask = torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x, _ in batch])
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            losses.append(loss.item())
            if step % 10 == 0 or step == steps:
                print(f"{task}: epoch {epoch + 1} step {step}/{steps} loss {sum(losses[-10:]) / len(losses[-10:]):.3f}"
                      f" ({time.monotonic() - started:.0f} s)", flush=True)
    # Named for the model it was trained on, not for this machine's folder.
    model.peft_config["default"].base_model_name_or_path = BASE_MODEL
    model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)  # peft's empty model card
    open_to_others(out)
    return {"task": task, "steps": steps, "final_loss": sum(losses[-10:]) / len(losses[-10:]),
            "seconds": round(time.monotonic() - started, 1)}


def main() -> None:
    from faas.bundled import SMOLLM2, models_dir
    from runtime.models.hf import quiet_transformers
    from runtime.models.smollm2 import ensure_smollm2

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("tasks", nargs="*", choices=[*TASKS, []], help="default: all")
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    quiet_transformers()
    models_dir().mkdir(parents=True, exist_ok=True)
    if ensure_smollm2(models_dir()) is None:
        raise SystemExit("SmolLM2 is unavailable: see " + str(models_dir() / f"{SMOLLM2}.unavailable"))
    for task in args.tasks or TASKS:
        print(train(models_dir() / SMOLLM2, task, ADAPTERS / task, epochs=args.epochs), flush=True)


if __name__ == "__main__":
    main()
