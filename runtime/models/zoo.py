"""Builds the bundled models: the tiny ones here (no hub, fixed seeds, saved with
save_pretrained), the real one in `runtime.models.smollm2`.

A byte-level BPE tokenizer trained on generated text, a tiny Llama (hidden 256, 4 layers)
and a tiny Qwen2 with tied embeddings, each with LoRA adapters whose B matrices are
random (`init_lora_weights=False`) so every adapter changes the output. A stamp file
holds a hash of this module: the models are rebuilt when the builder changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from faas.bundled import MODEL_ENV, SMOLLM2, TINY_LLAMA, TINY_QWEN2, models_dir
from faas.logs import get_logger
from runtime.models.smollm2 import ensure_smollm2
from runtime.proc.children import open_to_others

log = get_logger()

_WORDS = (
    "the a an order ticket customer refund shipping delivery account password invoice "
    "payment card bank status update cancel return product price discount question answer "
    "please thanks hello help support agent summary report table select from where join "
    "group by count sum average user users orders items date month year week today "
    "summarize translate classify sentiment positive negative neutral review text "
    "reply email subject dear regards issue problem error fixed resolved pending"
).split()
_SPECIALS = ["<s>", "</s>", "<pad>"]


@dataclass(frozen=True)
class _Adapter:
    name: str
    seed: int
    targets: tuple[str, ...] = ("q_proj", "v_proj")


_ADAPTERS = {
    TINY_LLAMA: (_Adapter("support", 11), _Adapter("summarize", 12), _Adapter("sql", 13)),
    TINY_QWEN2: (_Adapter("chat", 21),),
}


def _builder_hash() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def _corpus(n_lines: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        words = rng.choices(_WORDS, k=rng.randint(5, 20))
        lines.append(" ".join(words).capitalize() + rng.choice([".", "?", "!", ":"]))
    return lines


def build_tokenizer(vocab_size: int = 4096):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(_corpus(20000, seed=0), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", padding_side="left")
    # A chat template like real instruction models ship, in the examples' "### Role:" style,
    # so OpenAI chat requests work on the bundled model.
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


_CHAT_TEMPLATE = (
    "{% for m in messages %}### {{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}### Assistant:{% endif %}")


def _config(model: str, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               max_position_embeddings=1024,
               # Wider than the default 0.02 so greedy output varies instead of repeating.
               initializer_range=0.1)
    if model == TINY_LLAMA:
        return LlamaConfig(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2,
                           tie_word_embeddings=False, **ids)
    return Qwen2Config(hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True, **ids)


def _build_model(model: str, out: Path, tokenizer) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(_config(model, tokenizer), dtype=torch.float32)
    base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.save_pretrained(out)
    tokenizer.save_pretrained(out)
    for adapter in _ADAPTERS[model]:
        torch.manual_seed(adapter.seed)
        cfg = LoraConfig(r=8, lora_alpha=16, target_modules=list(adapter.targets),
                         init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(out), cfg)
        peft_model.save_pretrained(out / "adapters" / adapter.name)


def ensure_tiny_models(root: Path) -> None:
    """Build the tiny models under `root` unless they are there from this version of the
    builder (its stamp `root/.builder`)."""
    stamp = root / ".builder"
    if stamp.is_file() and stamp.read_text() == _builder_hash():
        return
    from runtime.models.hf import quiet_transformers

    quiet_transformers()
    log.info("models_building", root=str(root))
    tmp = root / ".building"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tokenizer = build_tokenizer()
    for model in (TINY_LLAMA, TINY_QWEN2):
        _build_model(model, tmp / model, tokenizer)
    open_to_others(tmp)
    root.chmod(0o755)
    # Each model swapped in whole, so a concurrent reader never sees a half-built one.
    for model in (TINY_LLAMA, TINY_QWEN2):
        old = root / f".{model}.old"
        shutil.rmtree(old, ignore_errors=True)
        if (root / model).exists():
            (root / model).rename(old)
        (tmp / model).rename(root / model)
        shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(tmp, ignore_errors=True)
    stamp.write_text(_builder_hash())
    log.info("models_built", root=str(root))


def ensure_bundled_models(root: Path | None = None, real: bool = True) -> Path:
    """Build the tiny models and (with `real`) fetch and convert SmolLM2 under `root`
    (default `$FAAS_HOME/models`), each unless it is already there. Returns the folder."""
    root = root or models_dir()
    root.mkdir(parents=True, exist_ok=True)
    # Nodes sharing a FAAS_HOME start together: one builds, the others wait and find it built.
    with open(root / ".build.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        ensure_tiny_models(root)
        if real:
            ensure_smollm2(root)
    return root


if __name__ == "__main__":
    from faas.logs import configure_logging

    configure_logging()
    print(ensure_bundled_models(real=os.environ.get(MODEL_ENV) in (None, "", SMOLLM2)))
