"""`python -m runtime.discover [--bundled-models] [--uid N] [--network] DIR...`: print the
specs declared in the folders as one JSON line.

The node agent runs this in a subprocess so that importing user code never happens in
its own process. As the node's user it builds the bundled offline models when asked (the
example functions point at them), checks whether network namespaces are available, and
reads the function files; then it drops to `--uid` and, with `--network`, into an empty
network namespace, and only then imports them. Prints `{"functions": [...],
"network_refused": null | "<why>"}`, or `{"error": "..."}` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from faas.bundled import faas_home
from faas.logs import configure_logging
from runtime.isolation import Isolation, probe_network_namespace
from runtime.loader import discover
from runtime.modelzoo import ensure_bundled_models


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.discover")
    parser.add_argument("folders", nargs="+")
    parser.add_argument("--bundled-models", action="store_true")
    parser.add_argument("--uid", type=int)
    parser.add_argument("--network", action="store_true", help="isolate from the network")
    args = parser.parse_args(argv)
    real_stdout = sys.stdout
    # User modules may print at import; keep our stdout for the one JSON line.
    sys.stdout = sys.stderr
    configure_logging()
    try:
        if args.bundled_models:
            ensure_bundled_models()
        refused = probe_network_namespace() if args.network else None
        isolation = Isolation(uid=args.uid, network=args.network and refused is None)
        needs = [str(faas_home()), *args.folders]
        specs = [spec.describe() for spec in discover(args.folders, lambda: isolation.apply(needs))]
    except Exception as exc:  # any failure of user code is reported, not raised
        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), file=real_stdout)
        return 1
    print(json.dumps({"functions": specs, "network_refused": refused}), file=real_stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
