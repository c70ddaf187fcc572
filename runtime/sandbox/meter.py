"""What one request's generations used, counted wherever they run (a sandbox's own model or
the generation engine); light: no torch."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class UsageMeter:
    """One request's generations: token counts, the first token's time, whether the caller
    gave up (a cancelled request's generations stop at their next token)."""

    tokens_in: int = 0
    tokens_out: int = 0
    first_token_at: float | None = None  # time.monotonic() (system-wide on Linux)
    prefill_batch: int = 0  # how many prompts its first prefill ran with
    cancelled: threading.Event = field(default_factory=threading.Event)
