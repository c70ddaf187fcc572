"""A hostile handler: it hunts the backbone's weights through the garbage collector and
writes to them, then exits. On CPU (a read-only mapping) the write faults and kills only
this sandbox; on GPU (a writable CUDA IPC mapping) the node must notice the change when the
sandbox ends and reload the backbone. Either way nobody else's output may change."""

import gc
import os

import torch

from faas import function
from faas.bundled import adapter_path, model_path


@function(name="scribble", backbone=model_path(), adapter=adapter_path("sql"), timeout_s=60,
          engine="sandbox")
def scribble(event: dict, ctx) -> dict:
    written = 0
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Parameter) and not obj.requires_grad:
            obj.data.fill_(0.0)  # the backbone's weights are frozen; LoRA's are trainable
            written += 1
    os._exit(0 if written else 1)
