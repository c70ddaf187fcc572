"""The `faas` command: up, new, invoke, result, publish, ls, ping, top, events, deploy, rm,
rollback, gateway, logs, bench, demo.

`up` and `demo` run the runtime; they import it inside the command so that the SDK and
the client commands stay light (no torch; the parser reads `up`'s defaults from the node's
configuration, which imports none). Longer than most modules: one parser for every
command, each command a short function.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from importlib import metadata
from pathlib import Path
from typing import Any

import nats.errors

from faas import auth
from faas.bundled import first_build
from faas.client import Client
from faas.errors import FaasError
from faas.protocol import Invocation

DEFAULT_URL = "nats://127.0.0.1:4222"


def _client(args: argparse.Namespace) -> Client:
    # One-shot commands: fail at once when the server is not there.
    return Client(args.nats or DEFAULT_URL, max_reconnect_attempts=1,
                  **auth.from_args(args).options())


async def _admin(args: argparse.Namespace) -> Any:
    """A connection for operator commands: the given login, else the embedded server's
    node login from the local state folder."""
    return await auth.connect(args.nats or DEFAULT_URL, auth.from_args(args),
                              Path(args.state_dir) if getattr(args, "state_dir", None) else None)


def _fail(err: Exception) -> int:
    message = err.message if isinstance(err, FaasError) else f"{type(err).__name__}: {err}"
    code = f" {err.code}" if isinstance(err, FaasError) and err.code else ""
    print(f"error{code}: {message}", file=sys.stderr)
    return 1


def _cmd_up(args: argparse.Namespace) -> int:
    from runtime.node.up import UpOptions, up

    node = UpOptions().node
    node = replace(
        node, node_id=args.node_id or node.node_id, models_dirs=tuple(Path(m) for m in args.models or ()),
        metrics_port=args.metrics_port, metrics_host=args.http_host, ack_every_s=args.ack_every_s,
        sandbox=replace(node.sandbox, threads=args.sandbox_threads, keep_alive_s=args.sandbox_keep_alive_s,
                        max_batch=args.max_batch),
        backbone_keep_alive_s=args.backbone_keep_alive_s, batch_windows=not args.no_batch_window,
        memory_budget_gib=args.memory_budget_gib, device_memory_budget_gib=args.device_memory_budget_gib,
        engine_kv_gib=args.engine_kv_gib,
        events=replace(node.events, enabled=not args.no_events, ack_wait_s=args.event_ack_wait_s,
                       subjects=tuple(args.events_subjects.split(","))),
        jobs=replace(node.jobs, retention_s=args.job_retention_s, concurrency=args.jobs_concurrency,
                     ack_wait_s=args.event_ack_wait_s),
        preload=replace(node.preload, enabled=not args.no_preload, predictor=args.predictor,
                        horizon_s=args.preload_horizon_s, host_budget_gib=args.preload_budget_gib,
                        device_budget_gib=args.preload_device_budget_gib,
                        price_s_per_gib_s=args.preload_price, keep_alive_s=args.sandbox_keep_alive_s))
    # With a cluster's NATS and no folder the node serves what is deployed; alone it
    # serves ./functions, as the demo does.
    folders = args.functions or ([] if args.nats else ["functions"])
    return asyncio.run(up(UpOptions(
        functions_dirs=tuple(Path(f) for f in folders), nats_url=args.nats, port=args.port,
        credentials=auth.from_args(args), http_port=args.http, http_host=args.http_host,
        http_api_keys=args.http_api_keys, http_adapter_backbone=args.http_adapter_backbone,
        http_timeout_s=args.http_timeout_s, state_dir=Path(args.state_dir) if args.state_dir else None,
        device=args.device, sandbox_uids=_uid_range(args.sandbox_uids),
        network_isolation=not args.no_network_isolation, reload=args.reload, node=node)))


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value != value or abs(value) == float("inf"):
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _positive(text: str) -> float:
    """argparse type: a finite number above zero (seconds, GiB)."""
    if (value := _finite(text)) <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _at_least(least: float) -> Any:
    """argparse type: a number of seconds no smaller than `least`."""
    def parse(text: str) -> float:
        value = _positive(text)
        if value < least:
            raise argparse.ArgumentTypeError(f"must be at least {least:g}, got {text!r}")
        return value

    return parse


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds, zero or more."""
    if (value := _finite(text)) < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, got {text!r}")
    return value


def _count(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def _uid_range(text: str) -> tuple[int, int] | str | None:
    if text == "off":
        return None
    if text == "auto":
        return text
    try:
        first, last = (int(part) for part in text.split("-"))
    except ValueError:
        raise SystemExit(f"faas up: --sandbox-uids wants FIRST-LAST, auto or off, got {text!r}") from None
    if not 0 < first < last:
        raise SystemExit(f"faas up: --sandbox-uids {text!r} is not a range of positive uids")
    return first, last


# The most NATS lets a server carry in one message.
_MAX_EVENT_BYTES = 64 << 20
_INVOKE_TIMEOUT_S = 60.0


def _read_input(where: str, limit: int) -> bytes:
    """At most `limit` + 1 bytes of stdin (`-`) or of the file `where`: one more than the
    caller accepts says it is too large without reading on (/dev/zero)."""
    if where == "-":
        return sys.stdin.buffer.read(limit + 1)
    with open(where, "rb") as f:
        return f.read(limit + 1)


def _event(args: argparse.Namespace) -> Any:
    """The EVENT argument parsed as JSON (`-`: read from stdin, `@FILE`: from a file), or
    None after saying why it is not."""
    text = args.event
    try:
        if text == "-" or text.startswith("@"):
            text = _read_input("-" if text == "-" else text[1:], _MAX_EVENT_BYTES)
    except OSError as exc:
        print(f"error: cannot read EVENT from {args.event[1:]}: {exc.strerror or exc}", file=sys.stderr)
        return None
    if len(text) > _MAX_EVENT_BYTES:  # no message could carry it: do not read on (/dev/zero)
        print(f"error: EVENT takes more than {_MAX_EVENT_BYTES} bytes", file=sys.stderr)
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        print(f"error: EVENT is not JSON: {exc}", file=sys.stderr)
        return None


async def _invoke(args: argparse.Namespace) -> int:
    if (event := _event(args)) is None:
        return 2
    streamed = False
    try:
        async with _client(args) as client:
            if args.submit:
                job = await client.submit(args.function, event, timeout_s=args.timeout_s)
                print(job.id)  # the secret that reads the result: stdout only, not a log
                print(f"job {job.request_id} queued", file=sys.stderr)
                return 0
            timeout_s = args.timeout_s or _INVOKE_TIMEOUT_S
            if args.stream:
                result, streamed = await _print_stream(client, args.function, event, timeout_s)
            else:
                result = await client.invoke(args.function, event, timeout_s=timeout_s)
    except FaasError as err:
        return _fail(err)
    if not streamed:  # a plain function streams nothing: its output, as without --stream
        print(json.dumps(result.output, ensure_ascii=False, default=repr))
    if args.metrics:
        print(json.dumps(result.metrics), file=sys.stderr)
    return 0


async def _result(args: argparse.Namespace) -> int:
    from faas import jobs

    try:
        if args.request_id:  # an operator: the bucket, by the id logs show
            nc = await _admin(args)
            try:
                record = await jobs.read(nc, args.job)
            finally:
                await nc.close()
            print(json.dumps({"request_id": args.job, "function": record.function, "state": record.state,
                              "submitted": record.submitted, "node": record.node, "attempts": record.attempts,
                              **(record.outcome or {})}, ensure_ascii=False, default=repr))
            return 0
        async with _client(args) as client:
            result = await client.result(args.job, timeout_s=args.wait_s)
    except FaasError as err:
        return _fail(err)
    print(json.dumps(result.output, ensure_ascii=False, default=repr))
    if args.metrics:
        print(json.dumps(result.metrics), file=sys.stderr)
    return 0


async def _cancel(args: argparse.Namespace) -> int:
    from faas.jobs import request_id_of

    try:
        async with _client(args) as client:
            cancelled = await client.cancel_job(args.job)
    except FaasError as err:
        return _fail(err)
    print(f"job {request_id_of(args.job)}: " + ("cancelled" if cancelled else "done before the cancel: "
                                                 "its outcome stays (faas result)"))
    return 0


async def _print_stream(client: Client, function: str, event: Any,
                        timeout_s: float) -> tuple[Invocation, bool]:
    """Print a streamed invocation's text as it arrives, then a newline. Returns the reply
    and whether any text came. Raises the reply's FaasError (after ending the line of any
    text printed)."""
    streamed = False
    try:
        async with client.stream(function, event, timeout_s=timeout_s) as stream:
            async for chunk in stream:
                # Flushed each time: a pipe would otherwise hold the text until the end.
                sys.stdout.write(chunk.delta)
                sys.stdout.flush()
                streamed = True
    finally:
        if streamed:
            print()
    assert stream.result is not None  # the stream ended on its reply (else it raised)
    return stream.result, streamed


async def _ls(args: argparse.Namespace) -> int:
    from faas.client import listing
    from faas.deploy import deployed

    try:
        nc = await _admin(args)  # the listing names paths: an operator's view
        try:
            nodes = await listing(nc)
            records = await deployed(nc) if args.deployed else []
        finally:
            await nc.drain()
    except (FaasError, nats.errors.Error) as err:
        return _fail(err)
    if args.deployed:
        return _print_deployed(records, nodes, args.json)
    if args.json:
        print(json.dumps(nodes, indent=2))
        return 0
    rows = [("NODE", "FUNCTION", "BACKBONE", "ADAPTER", "IDLE", "BUSY", "ACTIVE", "STARTING",
             "QUEUED", "LEVELS", "PLANNED", "CHANCE", "WHY")]
    for node in nodes:
        for fn in node["functions"]:
            rows.append((node["node"], fn["name"], _short(fn["backbone"]), _short(fn["adapter"]),
                         fn["idle"], fn["busy"], fn.get("active", "-"), fn["starting"], fn["queued"],
                         ",".join(fn.get("levels", [])) or "-", fn.get("planned", "-"),
                         fn.get("chance", "-"), fn.get("why", "-")))
    # At 80 columns: who serves what and its sandboxes; the plan's details go first.
    print(format_table(rows, table_width(),
                       squeeze={"NODE": 12, "FUNCTION": 12, "BACKBONE": 12, "ADAPTER": 12, "WHY": 12},
                       drop=("WHY", "BACKBONE", "ADAPTER", "CHANCE", "PLANNED", "LEVELS", "STARTING")))
    if not nodes:
        print("(no node answered)", file=sys.stderr)
    return 0


def _print_deployed(records: list[dict[str, Any]], nodes: list[dict[str, Any]], as_json: bool) -> int:
    """Every deployed function: its live version, the nodes serving it (at which version),
    and why the others do not."""
    rows = []
    for record in records:
        name = record["name"]
        serving = {n["node"]: n.get("deployed", {}).get("serving", {}).get(name) for n in nodes}
        why_not = {n["node"]: n.get("deployed", {}).get("unavailable", {}).get(name) for n in nodes}
        rows.append({"function": name, "version": record["version"],
                     "serving": {node: v for node, v in serving.items() if v is not None},
                     "not_serving": {node: why for node, why in why_not.items() if why}})
    if as_json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [("FUNCTION", "VERSION", "SERVED BY", "WHY NOT")]
    for row in rows:
        served = ",".join(f"{node}@v{v}" for node, v in sorted(row["serving"].items())) or "-"
        why = "; ".join(f"{node}: {why}" for node, why in sorted(row["not_serving"].items()))
        table.append((row["function"], row["version"], served,
                      why or ("-" if row["serving"] else "no node answered" if not nodes else "no node serves it")))
    print(format_table(table, table_width(), squeeze={"FUNCTION": 12, "SERVED BY": 16, "WHY NOT": 16}))
    return 0


async def _events(args: argparse.Namespace) -> int:
    from faas import events

    try:
        nc = await _admin(args)
        try:
            if args.action == "replay":
                seq = await events.replay(nc, args.function, args.seq)
                print(f"replayed dead letter {args.seq} of {args.function} as event {seq}")
                return 0
            if args.action == "dlq":
                letters = await events.dead_letters(nc, args.function)
                if args.json:
                    print(json.dumps([{k: v for k, v in x.items() if k != "data"} for x in letters],
                                     indent=2, default=str))
                    return 0
                rows = [("SEQ", "SUBJECT", "EVENT_SEQ", "DELIVERED", "CODE", "ERROR")]
                rows += [(x["seq"], x["event"]["subject"], x["event"].get("sequence"),
                          x["event"].get("delivered"), x["error"].get("code"), x["error"]["message"][:80])
                         for x in letters]
                print(format_table(rows))
                return 0
            table = await events.pending(nc)
        finally:
            await nc.drain()
    except (FaasError, nats.errors.Error) as err:
        return _fail(err)
    if args.json:
        print(json.dumps(table, indent=2))
        return 0
    rows = [("FUNCTION", "TRIGGERS", "PENDING", "ACK_PENDING", "REDELIVERED", "DEAD_LETTERS", "NEXT_RUN")]
    rows += [(r["function"], ",".join(r["triggers"]), r["pending"], r["ack_pending"],
              r["redelivered"], r["dead_letters"], r["next_run"] or "-") for r in table]
    print(format_table(rows))
    return 0


async def _publish(args: argparse.Namespace) -> int:
    if (event := _event(args)) is None:
        return 2
    try:
        async with _client(args) as client:
            seq = await client.publish(args.subject, event, msg_id=args.msg_id)
    except FaasError as err:
        return _fail(err)
    print(f"stored as event {seq}")
    return 0


async def _deploy(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from faas import deploy
    from faas.bundled import faas_home
    from runtime.functions.catalog import build_bundled_models, deploy_isolation, discover_file
    from runtime.functions.loader import function_files

    scratch = tempfile.TemporaryDirectory(prefix="faas-deploy-")
    try:
        paths = [Path(p) for p in args.paths]
        if (args.adapter is None) == (not paths):
            raise FaasError("give DIR|FILE..., or --adapter DIR --name NAME --backbone MODEL")
        if args.adapter is not None:
            if args.name is None or args.backbone is None:
                raise FaasError("--adapter needs --name and --backbone")
            folder = Path(scratch.name)
            folder.chmod(0o755)  # discovery reads it under a uid of its own
            paths = [deploy.adapter_function(args.name, args.adapter, args.backbone, args.openai, folder)]
            for path in [*paths, *paths[0].rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)
        folders = [p for p in paths if p.is_dir()]
        for link in (f for folder in folders for f in folder.glob("*.py")):
            deploy.inside_folder(link)
        files = [deploy.inside_folder(p) for p in paths if p.is_file()] + function_files(folders)
        missing = [str(p) for p in paths if not p.exists()]
        if missing or not files:
            raise FaasError(f"nothing to deploy in {', '.join(missing or args.paths)}")
        if (slow := first_build()) is not None:
            print(f"building the bundled models ({slow}: about a minute)", file=sys.stderr)
        await build_bundled_models()  # example functions name the bundled model
        # The files are imported to learn what they declare: isolated, never with this
        # process's environment, network or the node's credentials.
        secrets = (str(Path(args.state_dir) if args.state_dir else faas_home() / "nats"),)
        isolation, locks, why_not = await deploy_isolation(secrets)
        if why_not:
            print(f"warning: {why_not}: the files are imported with your rights", file=sys.stderr)
        try:
            specs = [spec for path in files for spec in await discover_file(
                path, replace(isolation, expose=(*isolation.expose, str(path.parent))))]
        finally:
            for fd in locks:
                os.close(fd)
        records = [deploy.package(spec) for spec in specs]
        _print_files(records)
        nc = await _admin(args)
        try:
            rows = await deploy.deploy(nc, records, deploy.deployer(auth.from_args(args).user))
        finally:
            await nc.drain()
    except (FaasError, nats.errors.Error, OSError) as err:
        return _fail(err)
    finally:
        scratch.cleanup()
    for row in rows:
        print(f"{row['name']}: version {row['version']}" + ("" if row["changed"] else " (unchanged)"))
    return 0


def _print_files(records: list[tuple[dict[str, Any], dict[str, bytes]]]) -> None:
    """One line per file of each function a deploy stores, with its size, then the total
    (on stderr: the versions are the output)."""
    sizes: dict[str, int] = {}
    for record, blobs in records:
        adapter = (record["adapter"] or {}).get("files", {})
        for what, files in (("", record["code"]["files"]), ("adapter ", adapter)):
            for name, key in files.items():
                print(f"{record['name']}: {what}{name} ({_size(len(blobs[key]))})", file=sys.stderr)
        sizes |= {key: len(data) for key, data in blobs.items()}
    print(f"storing {len(sizes)} file(s), {_size(sum(sizes.values()))}, in NATS "
          "(those it holds already are skipped)", file=sys.stderr)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    size = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        size /= 1024
        if size < 1024 or unit == "GiB":
            break
    return f"{size:.1f} {unit}"


async def _rm_or_rollback(args: argparse.Namespace) -> int:
    from faas import deploy

    try:
        nc = await _admin(args)
        try:
            if args.command == "rm":
                await deploy.remove(nc, args.function)
                print(f"removed {args.function}")
            else:
                record = await deploy.rollback(nc, args.function, args.to,
                                               deploy.deployer(auth.from_args(args).user))
                print(f"{args.function}: version {record['version']} again")
        finally:
            await nc.drain()
    except (FaasError, nats.errors.Error) as err:
        return _fail(err)
    return 0


async def _secret(args: argparse.Namespace) -> int:
    from faas import secrets

    try:
        if args.action == "set":
            if (args.value is None) == (args.from_file is None):
                raise FaasError("give the value, - (stdin) or --from-file FILE: one of them")
            if args.from_file is not None or args.value == "-":
                value = _read_input(args.from_file or "-", secrets.MAX_VALUE_BYTES)
            else:
                value = args.value.encode()
        nc = await _admin(args)
        try:
            if args.action == "set":
                await secrets.set_secret(nc, args.name, value)
                print(f"set {args.name}")
            elif args.action == "rm":
                await secrets.remove_secret(nc, args.name)
                print(f"removed {args.name}")
            else:
                for name in await secrets.secret_names(nc):
                    print(name)
        finally:
            await nc.drain()
    except (FaasError, nats.errors.Error, OSError) as err:
        return _fail(err)
    return 0


async def _versions(args: argparse.Namespace) -> int:
    from faas import deploy

    try:
        nc = await _admin(args)
        try:
            rows = await deploy.versions(nc, args.function)
        finally:
            await nc.drain()
    except (FaasError, nats.errors.Error) as err:
        return _fail(err)
    if args.json:
        for row in rows:
            print(json.dumps(row))
        return 0
    table = [("VERSION", "DEPLOYED", "BY", "DIGEST", "LIVE")]
    for row in rows:
        live = ("live" + (f" (rollback {_when(row['rolled_back_at'])})" if row["rolled_back_at"] else "")
                if row["live"] else "")
        table.append((row["version"], _when(row["deployed_at"]), row["deployed_by"] or "-", row["digest"], live))
    print(format_table(table, table_width(), squeeze={"BY": 16}))
    return 0


def _when(timestamp: float | None) -> str:
    """A time as UTC, to the second (what a version listing needs)."""
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(timestamp))


async def _ping(args: argparse.Namespace) -> int:
    from faas.top import ping

    try:
        async with _client(args) as client:
            nodes = [n for n in await ping(client.nc) if n.startswith(args.node or "")]
    except (FaasError, nats.errors.Error) as err:
        return _fail(err)
    for node in nodes:
        print(node)
    return 0 if nodes else 1


async def _top(args: argparse.Namespace) -> int:
    from faas.top import run_top

    try:
        async with _client(args) as client:
            return await run_top(client.nc, interval_s=args.interval_s, once=args.once)
    except (FaasError, nats.errors.Error) as err:
        return _fail(err)


def _cmd_gateway(args: argparse.Namespace) -> int:
    from faas.gateway import run_gateway

    try:
        from faas.apikeys import ApiKeys

        keys = ApiKeys.load(args.api_keys) if args.api_keys else None
        return asyncio.run(run_gateway(args.nats or DEFAULT_URL, auth.from_args(args).options(),
                                       args.host, args.port, args.timeout_s, api_keys=keys,
                                       adapter_backbone=args.adapter_backbone))
    except FaasError as err:
        return _fail(err)


async def _logs(args: argparse.Namespace) -> int:
    from faas.logs_view import show_logs

    try:
        nc = await _admin(args)  # the logs' stream and subjects are the operators'
        try:
            return await show_logs(nc, args.function, args.lines, args.follow, args.json)
        finally:
            await nc.close()
    except (FaasError, nats.errors.Error) as err:
        return _fail(err)


def _short(path: str | None) -> str:
    if path is None:
        return "-"
    parts = Path(path).parts
    return "/".join(parts[-2:]) if len(parts) > 2 else path


def table_width() -> int | None:
    """The columns a table must fit in: the terminal's when stdout is one (asked each time:
    `faas top` follows a resized window; $COLUMNS may be stale there); else $COLUMNS when
    set; else None, no limit, so that a script reading the output gets whole cells."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns
    except (OSError, ValueError):  # not a terminal
        columns = os.environ.get("COLUMNS", "").strip()
        return int(columns) if columns.isdigit() and int(columns) > 0 else None


def _cut(text: str, width: int) -> str:
    """`text` in at most `width` characters, its middle replaced by an ellipsis: that
    keeps a node id's host and its unique suffix, a name's start and end."""
    if len(text) <= width:
        return text
    if width < 3:
        return text[:width]
    tail = (width - 1) // 2
    return text[:width - 1 - tail] + "…" + text[len(text) - tail:]


def format_table(rows: list[tuple[Any, ...]], width: int | None = None,
                 squeeze: dict[str, int] | None = None, drop: tuple[str, ...] = ()) -> str:
    """Left-aligned columns, the first row as header. With a `width`, no line is longer:
    the cells of the `squeeze` columns (header: narrowest width) are cut with an ellipsis,
    widest first; where that is not enough, the `drop` columns are left out, in that
    order, and a last line names them."""
    # Cells may hold what anyone who can write a bucket wrote (a version's deployer, a
    # reason a node gives): never a terminal's control sequence.
    cells = [["".join(c if c.isprintable() else "?" for c in str(cell)) for cell in row] for row in rows]
    header, squeeze = cells[0], squeeze or {}
    left_out: list[str] = []
    while True:
        shown = [i for i, name in enumerate(header) if name not in left_out]
        widths = {i: max(len(row[i]) for row in cells) for i in shown}
        if width is None:
            break
        over = sum(widths.values()) + 2 * (len(shown) - 1) - width
        room = {i: widths[i] - max(squeeze[header[i]], len(header[i]))
                for i in shown if header[i] in squeeze}
        while over > 0 and (narrowable := [i for i in room if room[i] > 0]):
            widest = max(narrowable, key=widths.__getitem__)
            widths[widest] -= 1
            room[widest] -= 1
            over -= 1
        droppable = [name for name in drop if name in header and name not in left_out]
        if over <= 0 or not droppable:
            break
        left_out.append(droppable[0])
    lines = ["  ".join(_cut(row[i], widths[i]).ljust(widths[i]) for i in shown).rstrip()
             for row in cells]
    if left_out:
        lines.append(f"(left out to fit: {', '.join(left_out)})")
    if width is not None:  # past what squeezing and dropping allow: a very narrow terminal
        lines = [line if len(line) <= width else line[:max(width - 1, 0)] + "…" for line in lines]
    return "\n".join(lines)


def _cmd_bench(rest: list[str]) -> int:
    from bench.paper import main as bench_main

    return bench_main(rest)


def _cmd_new(args: argparse.Namespace) -> int:
    from faas.scaffold import create

    try:
        files = create(args.name, Path(args.dir))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    folder = files[0].parent
    for path in files:
        print(f"created {path}")
    print(f"serve it: faas up --functions {folder}\n"
          f"call it:  faas invoke {args.name} '{{\"prompt\": \"hi\"}}'\n"
          f"test it:  pytest {folder / 'tests'}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from faas.demo import run_demo

    return asyncio.run(run_demo(Path(args.functions)))


def _node_id(text: str) -> str:
    from faas.protocol import valid_node_id

    if not valid_node_id(text):
        raise argparse.ArgumentTypeError(f"a node id is letters, digits, '-' and '_', got {text!r}")
    return text


def _nats_options(parser: argparse.ArgumentParser, url_help: str = "NATS URL") -> None:
    parser.add_argument("--nats", default=os.environ.get("FAAS_NATS_URL"),
                        help=f"{url_help} (default $FAAS_NATS_URL, then {DEFAULT_URL})")
    auth.add_arguments(parser)


def _admin_options(parser: argparse.ArgumentParser, url: bool = True) -> None:
    if url:
        _nats_options(parser)
    parser.add_argument("--state-dir", help="without a login: the embedded server's state folder, "
                        "for the node's credentials (default $FAAS_HOME/nats)")


def _events_options(parser: argparse.ArgumentParser, after_action: bool = False) -> None:
    """The options of `faas events`, also accepted after `dlq FN` / `replay FN SEQ`."""
    _nats_options(parser)
    parser.add_argument("--json", action="store_true", help="print JSON")
    _admin_options(parser, url=False)
    if after_action:
        # argparse copies a subcommand's defaults over what its parent parsed: without
        # defaults here, `faas events --json dlq FN` keeps its --json.
        for action in parser._actions:
            if action.option_strings:
                action.default = argparse.SUPPRESS


def _version() -> str:
    """The installed package's version (a source tree that was never installed has none)."""
    try:
        return metadata.version("faas-lora")
    except metadata.PackageNotFoundError:
        return "(not installed)"


def _up_arguments(up: argparse.ArgumentParser, o: Any) -> None:
    """`faas up`'s options, their defaults read from `o` (an UpOptions) and its node config."""
    n = o.node
    up.add_argument("--port", type=int, default=o.port, help="embedded nats-server port")
    _nats_options(up, "NATS URL(s), comma-separated; no embedded server is started")
    up.add_argument("--functions", action="append", metavar="DIR",
                    help="folder of function files (repeatable; default ./functions without "
                         "--nats, none with it); deployed functions are served as well")
    up.add_argument("--models", action="append", metavar="DIR",
                    help="folder of model folders where deployed functions' backbones are looked "
                         "up by fingerprint (repeatable; $FAAS_HOME/models always)")
    up.add_argument("--http", type=int, metavar="PORT", default=None,
                    help="also run the OpenAI-compatible HTTP gateway (faas gateway) on PORT")
    up.add_argument("--http-host", default=o.http_host,
                    help="address the gateway and --metrics-port listen on (0.0.0.0: all)")
    up.add_argument("--http-api-keys", metavar="FILE", type=Path, default=None,
                    help="the gateway's API keys (faas gateway --api-keys); without, it listens on "
                         "loopback addresses only")
    up.add_argument("--http-adapter-backbone", metavar="MODEL", type=Path, default=None,
                    help="the gateway's base model of adapters loaded through /v1/load_lora_adapter "
                         "(faas gateway --adapter-backbone)")
    up.add_argument("--http-timeout-s", type=_positive, default=o.http_timeout_s,
                    help="the gateway's budget per request (the function's timeout_s caps it)")
    up.add_argument("--metrics-port", type=int, metavar="PORT", default=None,
                    help="serve this node's Prometheus metrics on http://HOST:PORT/metrics")
    up.add_argument("--node-id", type=_node_id, default=None,
                    help="this node's name in the cluster (default: HOSTNAME-<6 hex>)")
    up.add_argument("--state-dir", help="embedded server data and log (default $FAAS_HOME/nats)")
    up.add_argument("--sandbox-threads", type=_count, default=n.sandbox.threads, help="torch threads per sandbox")
    up.add_argument("--max-batch", type=_count, default=n.sandbox.max_batch,
                    help="cap on every function's max_batch: requests one sandbox generates for "
                         "at once (1: no batching)")
    up.add_argument("--no-batch-window", action="store_true",
                    help="hand every request to its sandbox at once, also under contention")
    up.add_argument("--memory-budget-gib", type=_positive, default=None,
                    help="host memory the node may hold (default: 3/4 of the machine's); beyond "
                         "it idle sandboxes are offloaded, then requests get 503")
    up.add_argument("--device-memory-budget-gib", type=_positive, default=None,
                    help="device memory the node may hold (default: 9/10 of the GPU's)")
    up.add_argument("--engine-kv-gib", type=_positive, default=None,
                    help="each generation engine's KV cache (default: 1 GiB on a CPU, half the "
                         "GPU memory free after the backbone); a request it has no room for "
                         "within its TTFT SLO gets 503 with Retry-After")
    up.add_argument("--ack-every-s", type=_positive, default=n.ack_every_s,
                    help="while a request that asked for acknowledgements runs, acknowledge it "
                         "again this often (below any NATS service import's response threshold "
                         "on its way: 2 minutes on the embedded server)")
    up.add_argument("--event-ack-wait-s", type=_positive, default=n.events.ack_wait_s,
                    help="how long an event or an async job may go unacknowledged before JetStream "
                         "hands it out again (a running one is renewed every third; for jobs, whose "
                         "consumer all nodes share, the last node started sets it for all)")
    up.add_argument("--events-subjects", default=",".join(n.events.subjects),
                    help="what the events stream FAAS_EVENTS stores (comma-separated subjects); "
                         "every trigger must fall within them")
    up.add_argument("--no-events", action="store_true",
                    help="do not consume events for functions with triggers")
    up.add_argument("--job-retention-s", type=_at_least(60), default=n.jobs.retention_s,
                    help="how long an async job may wait to run, and its outcome is kept (set "
                         "when the first node makes the jobs' bucket; later nodes keep it)")
    up.add_argument("--jobs-concurrency", type=_count, default=n.jobs.concurrency,
                    help="how many async jobs this node runs at once (each is an invocation, "
                         "served by whichever node the queue group picks)")
    up.add_argument("--device", default=o.device, choices=("auto", "cpu", "cuda"),
                    help="where backbones live (auto: cuda when NVML sees a GPU)")
    up.add_argument("--backbone-keep-alive-s", type=_positive, default=n.backbone_keep_alive_s,
                    help="with --no-preload: how long an unused backbone stays loaded")
    up.add_argument("--sandbox-keep-alive-s", type=_positive, default=n.sandbox.keep_alive_s,
                    help="with --no-preload: how long an idle sandbox is kept for its function's "
                         "next request; with pre-loading, the keep-alive of functions with too "
                         "little history and of the extra sandboxes a burst started")
    up.add_argument("--no-preload", action="store_true",
                    help="no predictive pre-loading: sandboxes and backbones start on demand "
                         "and live for their keep-alives")
    up.add_argument("--predictor", default=n.preload.predictor, choices=("histogram", "rate"),
                    help="how the pre-loader predicts invocations (default: hybrid histogram)")
    up.add_argument("--preload-horizon-s", type=_positive, default=n.preload.horizon_s,
                    help="the pre-loader plans for invocations within this long")
    up.add_argument("--preload-budget-gib", type=_positive, default=None,
                    help="host memory the pre-loader may fill (default: a quarter of the machine's)")
    up.add_argument("--preload-device-budget-gib", type=_positive, default=None,
                    help="device memory the pre-loader may fill (default: half the GPU's)")
    up.add_argument("--preload-price", type=_positive, default=n.preload.price_s_per_gib_s,
                    help="seconds of expected TTFT saved that justify holding 1 GiB for 1 s")
    up.add_argument("--sandbox-uids", metavar="FIRST-LAST|auto|off",
                    default=(o.sandbox_uids if isinstance(o.sandbox_uids, str)
                             else "-".join(map(str, o.sandbox_uids)) if o.sandbox_uids else "off"),
                    help="when run as root: one unprivileged uid per function from this range "
                         "(auto: the first of 61000-61999, 62000-62999... that no other node on "
                         "this host holds)")
    up.add_argument("--no-network-isolation", action="store_true",
                    help="let sandboxes use the network (default: an empty network namespace)")
    up.add_argument("--reload", action="store_true",
                    help="serve changes to the functions folders as they are saved (development)")
    up.set_defaults(run=_cmd_up)


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """Help that ends each option's text with its default, "(default: X)", where there is
    one worth saying: not None, not a flag's False, and not already told by the text
    itself (defaults taken from the environment say so: they may be secrets)."""

    @staticmethod
    def _says_default(action: argparse.Action) -> bool:
        text = action.help or ""
        return not (action.default is None or action.default is argparse.SUPPRESS or action.nargs == 0
                    or "default" in text or "(env " in text
                    or not (action.option_strings or action.nargs in ("?", "*")))

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._says_default(action):  # argparse shows no help at all
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if not self._says_default(action):
            return action.help
        return f"{action.help or ''} (default: %(default)s)".lstrip()


def _command(sub: Any, name: str, **options: Any) -> argparse.ArgumentParser:
    """A subcommand whose help shows its defaults."""
    return sub.add_parser(name, formatter_class=DefaultsHelpFormatter, **options)


def _needs_runtime(command: str, exc: ModuleNotFoundError) -> int:
    print(f"error: faas {command} needs the runtime (no module named {exc.name!r}): "
          "pip install 'faas-lora[runtime]'", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faas", description="Serverless LoRA functions on NATS.",
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--version", action="version", version=f"faas {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    up = _command(sub, "up", help="run a node (and an embedded nats-server unless --nats)")
    try:
        from runtime.node.up import UpOptions  # the node's options default to its configs: one source
    except ModuleNotFoundError as exc:  # the base install: the SDK and the client commands
        up.add_argument("options", nargs=argparse.REMAINDER)
        up.set_defaults(run=lambda _args, missing=exc: _needs_runtime("up", missing))
    else:
        _up_arguments(up, UpOptions())

    new = _command(sub, "new", help="write a function folder to start from: its file and its test")
    new.add_argument("name", help="the function's name (lower-case letters, digits, '_', '-')")
    new.add_argument("--dir", default=".", metavar="PATH", help="where the folder NAME goes")
    new.set_defaults(run=_cmd_new)

    invoke = _command(sub, "invoke", help="call a function and print its output as JSON")
    invoke.add_argument("function")
    invoke.add_argument("event", nargs="?", default="{}",
                        help="the event, a JSON object (-: read it from stdin, @FILE: from a file)")
    _nats_options(invoke)
    invoke.add_argument("--timeout-s", type=_positive, default=None,
                        help=f"the request's budget (default {_INVOKE_TIMEOUT_S:g}; with --submit the "
                             "job's, default an hour; the function's timeout_s caps it)")
    invoke.add_argument("--stream", action="store_true",
                        help="print the text as the function generates it (what it generates with "
                             "stream=True), then a newline; a function that streams nothing has its "
                             "output printed as JSON")
    invoke.add_argument("--metrics", action="store_true", help="print the metrics on stderr")
    invoke.add_argument("--submit", action="store_true",
                        help="queue it as an async job and print the job's id at once (it reads the "
                             "result: faas result ID); --timeout-s is then its budget once it runs")
    invoke.set_defaults(run=lambda a: asyncio.run(_invoke(a)))

    result = _command(sub, "result", help="the output of an async job (faas invoke --submit)")
    result.add_argument("job", help="the job's id (what submit printed), or with --request-id the "
                                    "request id logs show")
    result.add_argument("--wait-s", type=_seconds, default=60.0,
                        help="how long to wait for a job still queued or running (0: ask once)")
    result.add_argument("--metrics", action="store_true", help="print the metrics on stderr")
    result.add_argument("--request-id", action="store_true",
                        help="an operator's look at any job by its request id (its record, as JSON; "
                             "needs an operator's login)")
    _admin_options(result)
    result.set_defaults(run=lambda a: asyncio.run(_result(a)))

    cancel = _command(sub, "cancel", help="cancel an async job: never run if queued, stopped if running")
    cancel.add_argument("job", help="the job's id (what submit printed)")
    _nats_options(cancel)
    cancel.set_defaults(run=lambda a: asyncio.run(_cancel(a)))

    ls = _command(sub, "ls", help="list the functions every node serves, with their sandboxes")
    _admin_options(ls)
    ls.add_argument("--json", action="store_true",
                    help="print JSON, with budgets, level profiles, batch windows and memory")
    ls.add_argument("--deployed", action="store_true",
                    help="every deployed function instead: its live version, the nodes serving it, "
                         "and why the others do not")
    ls.set_defaults(run=lambda a: asyncio.run(_ls(a)))

    events = _command(sub, "events", help="pending events per function, dead letters, replay",
                      description="Without a subcommand: per function with triggers, its events "
                                  "pending, delivered but not acked, redelivered, and its dead letters.")
    _events_options(events)
    actions = events.add_subparsers(dest="action", metavar="{dlq,replay}")
    dlq = _command(actions, "dlq", help="list a function's dead letters (subject, deliveries, error)")
    dlq.add_argument("function")
    _events_options(dlq, after_action=True)
    replay = _command(actions, "replay", help="publish a dead letter again on its subject")
    replay.add_argument("function")
    replay.add_argument("seq", type=int, help="the dead letter's sequence (faas events dlq FN)")
    _events_options(replay, after_action=True)
    events.set_defaults(run=lambda a: asyncio.run(_events(a)))

    publish = _command(sub, "publish", help="publish an event to JetStream for triggered functions")
    publish.add_argument("subject", help="e.g. events.orders.created")
    publish.add_argument("event", nargs="?", default="{}",
                         help="the event, a JSON object (-: read it from stdin, @FILE: from a file)")
    publish.add_argument("--msg-id", help="de-duplication id (default: a new one)")
    _nats_options(publish)
    publish.set_defaults(run=lambda a: asyncio.run(_publish(a)))

    deploy = _command(sub, "deploy", help="store functions (code, adapters) in NATS for every node")
    deploy.add_argument("paths", nargs="*", metavar="DIR|FILE")
    as_data = deploy.add_argument_group("an adapter as data, with a default handler (no Python file)")
    as_data.add_argument("--adapter", metavar="DIR", type=Path, help="a peft LoRA adapter folder")
    as_data.add_argument("--name", help="the function's name")
    as_data.add_argument("--backbone", metavar="MODEL", type=Path, help="its base model's folder")
    as_data.add_argument("--openai", action="store_true", help="also an OpenAI model of the gateway")
    _admin_options(deploy)
    deploy.set_defaults(run=lambda a: asyncio.run(_deploy(a)))

    for name, what in (("rm", "stop serving a deployed function on every node"),
                       ("rollback", "serve a deployed function's previous version again")):
        cmd = _command(sub, name, help=what)
        cmd.add_argument("function")
        if name == "rollback":
            cmd.add_argument("--to", type=_count, metavar="N", help="this version (see faas versions)")
        _admin_options(cmd)
        cmd.set_defaults(run=lambda a: asyncio.run(_rm_or_rollback(a)))

    secret = _command(sub, "secret", help="set, list and remove the secrets functions declare")
    secret_sub = secret.add_subparsers(dest="action", required=True)
    secret_set = _command(secret_sub, "set", help="store a secret (its value from the argument, "
                          "--from-file, or stdin)")
    secret_set.add_argument("name")
    secret_set.add_argument("value", nargs="?", help="the value (-: read it from stdin; omitted: "
                            "--from-file); an argument shows in the shell's history")
    secret_set.add_argument("--from-file", metavar="FILE", help="read the value from FILE")
    _command(secret_sub, "ls", help="the names of the secrets set (never their values)")
    secret_rm = _command(secret_sub, "rm", help="remove a secret")
    secret_rm.add_argument("name")
    for cmd in secret_sub.choices.values():  # after the action: `faas secret ls --nats URL`
        _admin_options(cmd)
    secret.set_defaults(run=lambda a: asyncio.run(_secret(a)))

    versions = _command(sub, "versions", help="the versions of a deployed function, and which is live")
    versions.add_argument("function")
    versions.add_argument("--json", action="store_true", help="one JSON object a version")
    _admin_options(versions)
    versions.set_defaults(run=lambda a: asyncio.run(_versions(a)))

    ping = _command(sub, "ping", help="list the nodes answering $SRV.PING; exit 1 if none")
    ping.add_argument("--node", help="only nodes whose id starts with this (a health check)")
    _nats_options(ping)
    ping.set_defaults(run=lambda a: asyncio.run(_ping(a)))

    top = _command(sub, "top", help="a live view of the cluster from the nodes' $SRV.STATS")
    top.add_argument("--interval-s", type=_positive, default=1.0, help="seconds between redraws")
    top.add_argument("--once", action="store_true", help="print one view and exit")
    _nats_options(top)
    top.set_defaults(run=lambda a: asyncio.run(_top(a)))

    gateway = _command(sub, "gateway", help="an OpenAI-compatible HTTP gateway over NATS")
    gateway.add_argument("--port", type=int, default=8080, help="port to listen on")
    gateway.add_argument("--host", default="127.0.0.1",
                         help="address to listen on (0.0.0.0: all, with --api-keys only)")
    gateway.add_argument("--api-keys", metavar="FILE", type=Path, default=None,
                         help="JSON: {\"keys\": [{\"name\", \"key\", \"functions\": [NAME or *]}]}; "
                              "callers send Authorization: Bearer KEY (without: open, on loopback only)")
    gateway.add_argument("--adapter-backbone", metavar="MODEL", type=Path, default=None,
                         help="the base model folder of adapters loaded through /v1/load_lora_adapter "
                              "(by keys with \"adapters\": true); without, none are loaded")
    gateway.add_argument("--timeout-s", type=_positive, default=120.0,
                         help="the budget of each request (the function's timeout_s caps it)")
    _nats_options(gateway)
    gateway.set_defaults(run=_cmd_gateway)

    logs = _command(sub, "logs", help="what a function's handlers print and log, with request ids")
    logs.add_argument("function")
    logs.add_argument("--follow", "-f", action="store_true", help="keep printing new lines")
    logs.add_argument("--lines", "-n", type=_count, default=100, help="how many stored lines first")
    logs.add_argument("--json", action="store_true", help="one JSON object a line")
    _admin_options(logs)
    logs.set_defaults(run=lambda a: asyncio.run(_logs(a)))

    bench = _command(sub, "bench", help="replay a workload against serving modes (faas bench -h)",
                     add_help=False)
    bench.set_defaults(run=None)

    demo = _command(sub, "demo", help="build the tiny model, serve the examples, call each")
    demo.add_argument("--functions", default="functions", metavar="DIR",
                      help="the folder of functions to serve and call")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # its options belong to the benchmark program
        return _cmd_bench(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args))
    except ModuleNotFoundError as exc:  # a command that runs the runtime, on the base install
        if exc.name and exc.name.split(".")[0] in ("faas", "runtime", "bench", "training"):
            raise
        return _needs_runtime(args.command, exc)


if __name__ == "__main__":
    sys.exit(main())
