"""The engine's mixed-adapter LoRA step (runtime/engine/stacked.py) against peft: every
row of a mixed batch gets the logits peft gives for its own adapter alone."""

from __future__ import annotations

import torch
from peft import LoraConfig, PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

from runtime.engine.stacked import StackedLora

# Different ranks and targets: the stacks pad ranks, a layer some adapter skips adds nothing.
ADAPTERS = {
    "qv8": LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all4": LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp16": LoraConfig(r=16, lora_alpha=8, target_modules=["down_proj", "v_proj"], use_rslora=True),
}


def _model(adapters: dict[str, LoraConfig]) -> PeftModel:
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96,
                                        num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2)).eval()
    model = None
    for name, config in adapters.items():
        if model is None:
            model = PeftModel(base, config, adapter_name=name)
        else:
            model.add_adapter(name, config)
    for name, param in model.named_parameters():
        if "lora_" in name or "magnitude" in name:
            torch.nn.init.normal_(param, std=0.1)  # B too: a fresh adapter would add nothing
    return model.eval()


def _alone(model: PeftModel, ids: torch.Tensor, adapter: str | None) -> torch.Tensor:
    if adapter is None:
        with model.disable_adapter():
            return model(input_ids=ids).logits
    model.set_adapter(adapter)
    return model(input_ids=ids).logits


def _mixed(model: PeftModel, lora: StackedLora, ids: torch.Tensor, rows: list[str | None]) -> torch.Tensor:
    return model(input_ids=ids, **lora.route(rows, "cpu")).logits


@torch.no_grad()
def test_each_row_of_a_stacked_batch_equals_peft_for_its_adapter_alone():
    model, reference = _model(ADAPTERS), _model(ADAPTERS)  # the same seed: the same weights
    lora = StackedLora()
    lora.rebuild(model)
    assert lora.stacked
    rows = ["qv8", None, "all4", "mlp16", "qv8", "gone"]  # "gone": an adapter just removed
    ids = torch.randint(0, 128, (len(rows), 7), generator=torch.Generator().manual_seed(1))
    mixed = _mixed(model, lora, ids, rows)
    for i, adapter in enumerate(rows):
        alone = _alone(reference, ids[i:i + 1], adapter if adapter != "gone" else None)
        torch.testing.assert_close(mixed[i:i + 1], alone, atol=1e-5, rtol=1e-5)
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3  # the adapters do change the logits

    # An adapter removed: the stacks are rebuilt, its rows run bare, the others' are unchanged.
    model.delete_adapter("all4")
    lora.rebuild(model)
    after = _mixed(model, lora, ids, rows)
    for i in (0, 3, 4):
        torch.testing.assert_close(after[i], mixed[i], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(after[2:3], _alone(reference, ids[2:3], None), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_an_adapter_the_stacks_cannot_compute_runs_the_whole_model_on_peft():
    adapters = {"qv8": ADAPTERS["qv8"],
                "embed": LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])}
    model, reference = _model(adapters), _model(adapters)
    lora = StackedLora()
    lora.rebuild(model)
    assert not lora.stacked
    rows = ["embed", "qv8", None]
    assert lora.route(rows, "cpu") == {"adapter_names": ["embed", "qv8", "__base__"]}
    ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(2))
    mixed = _mixed(model, lora, ids, rows)
    for i, adapter in enumerate(rows):
        torch.testing.assert_close(mixed[i:i + 1], _alone(reference, ids[i:i + 1], adapter),
                                   atol=1e-5, rtol=1e-5)
