"""`python -m runtime.functions.discover --isolation JSON FILE`: print the specs one function file
declares, as one JSON line.

The node runs this once per file, in a subprocess isolated as the JSON says (see
runtime/proc/isolation.py) before the file is read, so importing user code never happens in the
node, nor with the node's rights. The output is untrusted: the node accepts only
functions that name this file as their source. Prints `{"functions": [...]}`, or
`{"error": "..."}` and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from faas.logs import configure_logging
from faas.sdk import defer_model_checks
from runtime.functions.loader import load_file, specs_in
from runtime.proc.isolation import Isolation


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m runtime.functions.discover")
    parser.add_argument("file")
    parser.add_argument("--isolation", type=json.loads, required=True)
    args = parser.parse_args(argv)
    real_stdout = sys.stdout
    # User modules may print at import; keep our stdout for the one JSON line.
    sys.stdout = sys.stderr
    configure_logging()
    try:
        Isolation.from_dict(args.isolation).enter()
        defer_model_checks()  # the node checks them: this namespace may hide them
        specs = [spec.record().to_dict() for spec in specs_in(load_file(args.file))]
    except Exception as exc:  # any failure of user code is reported, not raised
        traceback.print_exc()
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}), file=real_stdout)
        return 1
    print(json.dumps({"functions": specs}), file=real_stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
