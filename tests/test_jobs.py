"""Async jobs against the session node: submit returns at once, the result is read later by
another process holding the job's id, and by nobody without it."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
import time

import httpx
import msgpack
import nats
import pytest

from faas import (BadRequest, Cancelled, Client, DeadlineExceeded, FunctionNotFound, HandlerError, Job,
                  PayloadTooLarge)
from faas import jobs, protocol
from faas.auth import Credentials, connect
from tests.conftest import error_of
from tests.test_cli import faas
from tests.test_gateway import _sample


async def test_a_job_returns_at_once_and_another_process_reads_its_result(node, client):
    job = await client.submit("sleepy", {"s": 1.5})
    assert isinstance(job, Job) and job.function == "sleepy" and len(job.id) >= 32
    with pytest.raises(DeadlineExceeded, match=f"job {job.request_id} is still"):
        await client.result(job, timeout_s=0)  # it runs for 1.5 s: not done yet
    reader = (f"import asyncio, json; from faas import Client\n"
              f"async def main():\n"
              f"    async with Client({node.url!r}) as c:\n"
              f"        r = await c.result({job.id!r}, timeout_s=60)\n"
              f"        print(json.dumps(r.output))\n"
              f"asyncio.run(main())\n")
    out = subprocess.run([sys.executable, "-c", reader], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["slept_s"] == 1.5
    # Kept: read again, here, it is the same outcome.
    again = await client.result(job.id, timeout_s=5)
    assert again.output["slept_s"] == 1.5 and again.metrics["node"]


async def test_a_job_is_refused_to_whoever_lacks_its_id(node, client):
    job = await client.submit("echo", {"secret": "for the submitter"})
    assert (await client.result(job, timeout_s=30)).output["echo"] == {"secret": "for the submitter"}
    async with Client(node.url) as other:  # another producer, knowing what logs show
        for guess in (job.request_id, job.id[:-1] + ("0" if job.id[-1] != "0" else "1")):
            with pytest.raises(FunctionNotFound, match="no such job"):
                await other.result(guess, timeout_s=0)
    conn = await nats.connect(node.url)
    try:
        no_key = await conn.request(protocol.JOBS_RESULT_SUBJECT, b"", timeout=5)
        assert error_of(no_key)[0] == 400
        bad_key = await conn.request(protocol.JOBS_RESULT_SUBJECT, b"", timeout=5,
                                     headers={protocol.HDR_REQUEST_KEY: "short"})
        assert error_of(bad_key)[0] == 400
        # The bucket itself is the nodes' account's: a producer's login has no JetStream there.
        with pytest.raises(Exception):
            kv = await conn.jetstream().key_value(protocol.JOBS_BUCKET)
            await kv.get(job.request_id)
    finally:
        await conn.close()
    # An operator's login reads any job by its request id.
    admin = await connect(node.url, Credentials(), node.state_dir)
    try:
        record = await jobs.read(admin, job.request_id)
        assert record.state == "done" and record.function == "echo" and record.attempts == 1
        assert record.invocation().output["echo"] == {"secret": "for the submitter"}
        # Its run is the request <request_id>-<try>: what the invocation's logs show.
        assert record.invocation().metrics["request_id"] == f"{job.request_id}-1"
    finally:
        await admin.close()


async def test_a_failing_job_keeps_its_error_and_a_bad_submit_is_refused_at_once(node, client):
    job = await client.submit("boom", {"why": "the job"})
    with pytest.raises(HandlerError, match="bad things: the job"):
        await client.result(job, timeout_s=30)
    with pytest.raises(FunctionNotFound):
        await client.submit("no-such-function", {})
    with pytest.raises(PayloadTooLarge):
        await client.submit("echo", {"blob": "x" * (2 << 20)})
    conn = await nats.connect(node.url)
    try:
        subject = protocol.JOBS_SUBMIT_PREFIX + "echo"
        for body, headers, code in (
                (msgpack.packb({}), None, 400),  # no job id
                (b"[1, 2]", {protocol.HDR_REQUEST_KEY: "k" * 32}, 400),  # not an object
                (msgpack.packb({}), {protocol.HDR_REQUEST_KEY: "k" * 32, "X-Pad": "p" * 5000}, 400)):
            assert error_of(await conn.request(subject, body, headers=headers, timeout=5))[0] == code
        # A function name no node could have: 404, and the answer does not echo it whole.
        code, message = error_of(await conn.request(protocol.JOBS_SUBMIT_PREFIX + "x" * 300, msgpack.packb({}),
                                                    headers={protocol.HDR_REQUEST_KEY: "k" * 32}, timeout=5))
        assert code == 404 and len(message) < 200
    finally:
        await conn.close()


async def test_a_job_recorded_but_never_queued_is_queued_by_the_producer_s_retry(node, client):
    """A submit whose queueing was not confirmed (JetStream answered late: the node said 503,
    or the producer heard nothing) leaves the record `queued`; the SDK sends the submit again
    with the job's id, and that queues it, once."""
    job_id = protocol.new_request_key()
    admin = await connect(node.url, Credentials(), node.state_dir)
    try:
        kv = await admin.jetstream().key_value(protocol.JOBS_BUCKET)
        await kv.create(jobs.request_id_of(job_id), jobs.queued("echo").pack())  # no message queued
        job = await client.submit("echo", {"healed": True}, job_id=job_id)
        assert (await client.result(job, timeout_s=30)).output["echo"] == {"healed": True}
        assert (await jobs.read(admin, job.request_id)).attempts == 1
    finally:
        await admin.close()


async def test_the_same_job_id_queues_one_job_and_busy_jobs_wait_their_turn(node, client):
    job_id = protocol.new_request_key()
    first = await client.submit("echo", {"n": 1}, job_id=job_id)
    second = await client.submit("echo", {"n": 1}, job_id=job_id)  # a retry after a lost answer
    assert first == second and (await client.result(first, timeout_s=30)).output["echo"] == {"n": 1}
    with pytest.raises(BadRequest, match="another job"):
        await client.submit("sleepy", {}, job_id=job_id)
    # sleepy takes one at a time and queues one: the rest are refused (503) and tried again later.
    batch = [await client.submit("sleepy", {"s": 0.5, "i": i}) for i in range(4)]
    results = await asyncio.gather(*(client.result(j, timeout_s=90) for j in batch))
    assert sorted(r.output["slept_s"] for r in results) == [0.5] * 4
    admin = await connect(node.url, Credentials(), node.state_dir)
    try:
        attempts = [(await jobs.read(admin, j.request_id)).attempts for j in batch]
    finally:
        await admin.close()
    assert max(attempts) > 1, attempts  # some were refused for room, and ran on a later try


async def _until_running(client: Client, job: Job) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            await client.result(job, timeout_s=0)
        except DeadlineExceeded as err:
            if "still running" in err.message:
                return
        assert time.monotonic() < deadline, "the job never ran"
        await asyncio.sleep(0.1)


async def test_a_cancelled_job_stops_running_and_its_result_says_so(node, client):
    job = await client.submit("sleepy", {"s": 25})
    await _until_running(client, job)
    assert await client.cancel_job(job) is True
    with pytest.raises(Cancelled, match="cancelled"):
        await client.result(job, timeout_s=5)
    assert await client.cancel_job(job.id) is True  # again, from the id: still cancelled
    # Its invocation was cancelled too: sleepy's one sandbox (taken by the 25 s sleep, then
    # killed after the stop grace, as a cancelled handler that does not return is) serves
    # the next call within 15 s.
    assert (await client.invoke("sleepy", {"s": 0}, timeout_s=15)).output["slept_s"] == 0
    admin = await connect(node.url, Credentials(), node.state_dir)
    try:
        record = await jobs.read(admin, job.request_id)
        assert record.state == "done" and record.error().code == 499
    finally:
        await admin.close()


async def test_a_running_job_whose_cancel_word_was_lost_stops_at_its_next_look(node, client):
    """The record says cancelled but no node was told (the word lost, its node reconnecting):
    the node running the job looks at the record at each in-progress ack (a third of the ack
    wait, 10 s here) and cancels the invocation then: a 499 well before the 28 s it sleeps."""
    job = await client.submit("sleepy", {"s": 28})
    await _until_running(client, job)
    before = await _count(node, "sleepy", "499")
    admin = await connect(node.url, Credentials(), node.state_dir)
    try:
        kv = await admin.jetstream().key_value(protocol.JOBS_BUCKET)
        entry = await kv.get(job.request_id)
        record = jobs.JobRecord.unpack(entry.value)
        cancelled = {"error": {"code": 499, "message": "the job was cancelled"}, "cancelled": True}
        await kv.update(job.request_id, dataclasses.replace(record, state="done", outcome=cancelled).pack(),
                        last=entry.revision)
    finally:
        await admin.close()
    forged = time.monotonic()
    while await _count(node, "sleepy", "499") == before:
        assert time.monotonic() - forged < 24, "the run went on"
        await asyncio.sleep(0.2)
    with pytest.raises(Cancelled):
        await client.result(job, timeout_s=0)
    assert await client.cancel_job(job) is True


async def _count(node, function: str, code: str) -> float:
    async with httpx.AsyncClient() as http:
        return _sample((await http.get(node.metrics_url)).text, "faas_requests_total", function=function, code=code)


async def test_a_job_cancelled_at_once_never_has_an_output_and_a_done_one_keeps_its_own(node, client):
    job = await client.submit("sleepy", {"s": 2})
    assert await client.cancel_job(job) is True  # queued, or just taken: either way it ends here
    await asyncio.sleep(4)  # past the end of a run that was not stopped: it stays cancelled
    with pytest.raises(Cancelled):
        await client.result(job, timeout_s=0)
    done = await client.submit("echo", {"kept": True})
    assert (await client.result(done, timeout_s=30)).output["echo"] == {"kept": True}
    assert await client.cancel_job(done) is False  # finished first: its outcome stays
    async with Client(node.url) as other:  # another producer, knowing what logs show
        with pytest.raises(FunctionNotFound, match="no such job"):
            await other.cancel_job(done.request_id)
    assert (await client.result(done, timeout_s=0)).output["echo"] == {"kept": True}
    with pytest.raises(FunctionNotFound, match="no such job"):
        await client.cancel_job(protocol.new_request_key())
    with pytest.raises(BadRequest):
        await client.cancel_job("short")
    denied: asyncio.Queue[Exception] = asyncio.Queue()

    async def on_error(exc: Exception) -> None:
        await denied.put(exc)
    conn = await nats.connect(node.url, error_cb=on_error)
    try:
        for headers in (None, {protocol.HDR_REQUEST_KEY: "short"},  # no id, a malformed one
                        {protocol.HDR_REQUEST_KEY: "k" * 32, "X-Pad": "p" * 5000}):  # headers too large
            assert error_of(await conn.request(protocol.JOBS_CANCEL_SUBJECT, b"", headers=headers,
                                               timeout=5))[0] == 400
        await conn.publish(protocol.JOBS_CANCELLED_SUBJECT, b"")  # the nodes' word, not a producer's
        await conn.flush()
        assert "permissions violation" in str(await asyncio.wait_for(denied.get(), 5)).lower()
    finally:
        await conn.close()
    # Telling the nodes a running job was cancelled stops nothing while its record says
    # otherwise.
    admin = await connect(node.url, Credentials(), node.state_dir)
    try:
        running = await client.submit("sleepy", {"s": 1.5})
        await _until_running(client, running)
        await admin.publish(protocol.JOBS_CANCELLED_SUBJECT, b"", headers={protocol.HDR_REQUEST_ID: running.request_id})
        assert (await client.result(running, timeout_s=30)).output["slept_s"] == 1.5
    finally:
        await admin.close()


def test_the_cli_submits_and_reads_a_job(node):
    submitted = faas("invoke", "echo", '{"via": "cli"}', "--submit", "--nats", node.url)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    request_id = jobs.request_id_of(job_id)
    assert f"job {request_id} queued" in submitted.stderr and job_id not in submitted.stderr
    out = faas("result", job_id, "--nats", node.url)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["echo"] == {"via": "cli"}
    record = faas("result", request_id, "--request-id", "--nats", node.url, "--state-dir", str(node.state_dir))
    assert record.returncode == 0, record.stderr
    assert json.loads(record.stdout)["state"] == "done"
    kept = faas("cancel", job_id, "--nats", node.url)
    assert kept.returncode == 0 and "done before the cancel" in kept.stdout, kept.stderr
    unknown = faas("result", "x" * 40, "--nats", node.url, "--wait-s", "0")
    assert unknown.returncode == 1 and "error 404" in unknown.stderr
    for garbage in ("../..", "a.b", "x" * 200):  # not a key of the bucket: a 400, not a traceback
        refused = faas("result", garbage, "--request-id", "--nats", node.url, "--state-dir", str(node.state_dir))
        assert refused.returncode == 1 and "error 400" in refused.stderr, refused.stderr
