"""The benchmarks' models and functions. `smollm2` (the default of `faas bench`): the bundled
SmolLM2-135M-Instruct (30 layers, hidden 576, its own tokenizer) in bf16; `m200`: a
~190M-parameter random Llama (hidden 1024, 16 layers, 16 heads / 8 KV) in bf16 with the
tiny models' tokenizer, built offline. Each with one LoRA adapter per function (rank 8 on
q_proj and v_proj, fixed seeds), and function files that serve them."""

from __future__ import annotations

from pathlib import Path

PROMPT = "Customer: my order arrived damaged, what can I do?\nAgent:"
# About one token of either tokenizer: n of these make a prompt of about n tokens.
PROMPT_WORD = "order "
BENCH_MODELS = ("smollm2", "m200")


def prompt_of(tokens: int) -> str:
    return PROMPT_WORD * tokens


def adapter_dir(model_dir: Path, i: int) -> Path:
    """Where the bench model's i-th adapter lives (function i of a run serves it)."""
    return model_dir / "adapters" / f"a{i}"


def adapters_of(model_dir: Path, names: list[str]) -> dict[str, Path]:
    """Function name -> its adapter folder, in the order the functions are named."""
    return {name: adapter_dir(model_dir, i) for i, name in enumerate(names)}


def build_model(root: Path, n_adapters: int, model: str = "smollm2") -> Path:
    """The bench backbone `model` and `n_adapters` adapters under root (kept across runs)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from runtime.models.hf import quiet_transformers
    from runtime.proc.children import open_to_others
    from runtime.models.zoo import build_tokenizer

    if model not in BENCH_MODELS:
        raise ValueError(f"bench model {model!r}: expected one of {', '.join(BENCH_MODELS)}")
    model_dir = root / model
    # Complete when the last files each step writes are there (a build is deterministic).
    if (model_dir / "model.safetensors").exists() and all(
            (adapter_dir(model_dir, i) / "adapter_model.safetensors").exists()
            for i in range(n_adapters)):
        return model_dir
    quiet_transformers()
    if model == "smollm2":
        from faas.bundled import models_dir, smollm2_unavailable_file
        from runtime.models.smollm2 import ensure_smollm2

        models_dir().mkdir(parents=True, exist_ok=True)
        source = ensure_smollm2(models_dir())
        if source is None:
            raise SystemExit(f"SmolLM2 is unavailable ({smollm2_unavailable_file().read_text().strip()}): "
                             "benchmark the random model with --model m200")
        tokenizer = AutoTokenizer.from_pretrained(source)
        base = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    else:
        tokenizer = build_tokenizer()
        config = LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=16,
                             num_attention_heads=16, num_key_value_heads=8,
                             vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                             max_position_embeddings=1024)
        torch.manual_seed(0)
        base = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        base.generation_config.pad_token_id = tokenizer.pad_token_id
    base.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, task_type="CAUSAL_LM",
                                                 target_modules=["q_proj", "v_proj"]))
    for i in range(n_adapters):
        torch.manual_seed(100 + i)
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                torch.nn.init.normal_(param, std=0.02)
        peft_model.save_pretrained(adapter_dir(model_dir, i))
    open_to_others(model_dir)
    return model_dir


def write_functions(folder: Path, model_dir: Path, names: list[str], engine: str = "shared") -> None:
    """One function file per name, function i on adapter a<i>, generating where `engine`
    says (FunctionSpec.engine). An event carries either a `prompt`, or `prompt_tokens` (a
    prompt of about that many tokens is made) and `output_tokens` (default 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, adapter in adapters_of(model_dir, names).items():
        (folder / f"{name}.py").write_text(
            "from faas import function\n"
            f"@function(name={name!r}, backbone={str(model_dir)!r}, "
            f"adapter={str(adapter)!r}, timeout_s=300, max_queue=1024, "
            f"max_instances=8, engine={engine!r})\n"
            "def handler(event, ctx):\n"
            f"    prompt = event.get('prompt') or {PROMPT_WORD!r} * int(event['prompt_tokens'])\n"
            "    r = ctx.generate(prompt, max_new_tokens=int(event.get('output_tokens', 1)), ignore_eos=True)\n"
            "    return {'tokens': len(r.token_ids)}\n")
