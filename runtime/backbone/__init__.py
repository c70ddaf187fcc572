"""The shared backbone: one copy of a base model's weights per node, mapped by everyone who
generates with it.

- `process`: the backbone process, which loads a model in its own dtype and exports its
  tensors (`python -m runtime.backbone.process`);
- `registry`: the node's backbones (started on first use, kept while used, released after a
  keep-alive), and the device a node runs on;
- `weights`: the export and attach per device (a sealed shared file on CPU, CUDA IPC on a
  GPU) and the digests that detect a changed weight;
- `skeleton`: a model built on the `meta` device and bound to the shared tensors;
- `warm`: what backbones and engines have in common: one per model, started once, kept warm
  for a while after the last user.
"""
