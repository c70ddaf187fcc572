"""What checking a backbone's weights costs: the SHA-256 digest (runtime/backbone/weights.py) against
the word-sum checksum it replaced, which swapped rows did not change.

    python -m bench.digest [--mib 512] [--rounds 3] [--out results/digest.json]

Tensors shaped like a Llama's (bf16 matrices of 4096 columns) filling `--mib` MiB, in this
process on the CPU; each method reads them all `--rounds` times, interleaved, and the best
round counts (the machine is shared). It also reports the time either takes for the 13.5 GB
of a 7B model in bf16 at that speed, the work a GPU backbone's check does every 60 s (there
each chunk first crosses to host memory: measured only on a GPU).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench import write_result
from runtime.backbone.weights import digest

_SEVEN_B_BYTES = 13.5e9


def word_sums(tensor: torch.Tensor, chunk_words: int = 1 << 24) -> tuple[int, int]:
    """The checksum digest() replaced: the sum and the sum of squares of the 32-bit words."""
    words = tensor.detach().reshape(-1).view(torch.int32)
    total = squares = 0
    for start in range(0, words.numel(), chunk_words):
        chunk = words[start:start + chunk_words].to(torch.int64)
        total += int(chunk.sum())
        squares += int((chunk * chunk).sum())
    return total, squares


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.digest")
    parser.add_argument("--mib", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("results/digest.json"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    columns = 4096
    rows = args.mib * 2**20 // (columns * 2) // 16
    tensors = [torch.randn(rows, columns, dtype=torch.bfloat16) for _ in range(16)]
    total = sum(t.numel() * t.element_size() for t in tensors)
    methods = {"sha256": digest, "word_sums": word_sums}
    best = {name: float("inf") for name in methods}
    for _ in range(args.rounds):
        for name, method in methods.items():
            started = time.perf_counter()
            for tensor in tensors:
                method(tensor)
            best[name] = min(best[name], time.perf_counter() - started)
    swapped = tensors[0].clone()
    swapped[[0, 1]] = swapped[[1, 0]]
    result = {
        "machine": "CPU", "threads": torch.get_num_threads(), "bytes": total, "rounds": args.rounds,
        "methods": {name: {"seconds": round(s, 4), "mib_per_s": round(total / 2**20 / s, 1),
                           "seconds_for_7b_bf16": round(_SEVEN_B_BYTES / (total / s), 2)}
                    for name, s in best.items()},
        "sees_swapped_rows": {name: method(swapped) != method(tensors[0]) for name, method in methods.items()},
    }
    result["sha256_over_word_sums"] = round(best["sha256"] / best["word_sums"], 2)
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
