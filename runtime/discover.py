"""`python -m runtime.discover [--bundled-models] DIR...`: print the specs declared in the
folders as one JSON line (building the bundled offline models first when asked, since the example
functions point at them).

The node agent runs this in a subprocess so that importing user code never happens in
its own process. On failure it prints `{"error": "..."}` and exits 1.
"""

from __future__ import annotations

import json
import sys
import traceback

from faas.logs import configure_logging
from runtime.loader import discover
from runtime.modelzoo import ensure_bundled_models


def main(argv: list[str]) -> int:
    real_stdout = sys.stdout
    # User modules may print at import; keep our stdout for the one JSON line.
    sys.stdout = sys.stderr
    try:
        folders = [arg for arg in argv if arg != "--bundled-models"]
        if "--bundled-models" in argv:
            configure_logging()
            ensure_bundled_models()
        specs = [spec.describe() for spec in discover(folders)]
    except Exception as exc:  # any failure of user code is reported, not raised
        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), file=real_stdout)
        return 1
    print(json.dumps({"functions": specs}), file=real_stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
