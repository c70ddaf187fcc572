"""One instance of a classic serverless function (the `isolated` and `fast-load` baselines):
a fresh process that loads its own backbone copy and its adapter, then answers requests
read from stdin, one JSON line each, with one JSON line on stdout:
`{"first_token_at": <time.monotonic()>, "tokens": n}` (the clock is system-wide, so the
platform computes TTFT from its own receive time, as a faas node does).

    python -m bench.instance --model DIR --adapter DIR [--drop-cache]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def drop_from_page_cache(folder: Path) -> None:
    """Make the next read of these files come from storage, as on a node that never had them."""
    for path in folder.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.instance")
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--adapter", type=Path, required=True)
    parser.add_argument("--drop-cache", action="store_true")
    args = parser.parse_args()
    if args.drop_cache:
        drop_from_page_cache(args.model)
        drop_from_page_cache(args.adapter)
    import torch

    from bench.models import prompt_of
    from runtime.sandbox.model import load_lora_model
    from runtime.sandbox.meter import UsageMeter

    torch.set_num_threads(1)
    model = load_lora_model(str(args.model), str(args.adapter))
    for param in model.model.parameters():
        param.data = param.data.clone()  # its own copy: instances share nothing
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        event = json.loads(line)
        meter = UsageMeter()
        prompt = prompt_of(int(event["prompt_tokens"]))
        result = model.generate(prompt, meter, max_new_tokens=int(event["output_tokens"]),
                                 ignore_eos=True)
        print(json.dumps({"first_token_at": meter.first_token_at,
                          "tokens": len(result.token_ids)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
