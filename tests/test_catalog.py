"""What the node accepts from discovery (whose answers come from user code) and how it
shares a host with other nodes."""

from __future__ import annotations

import os

import pytest

from faas import Client, FaasError
from faas.errors import SpecError
from faas.record import FunctionRecord
from faas.localnode import LocalNode
from tests.conftest import TEST_FUNCTIONS, second_node, uid_range

GOOD = {"name": "fn", "backbone": "/m", "adapter": "/m/a", "timeout_s": 10.0, "max_queue": 4,
        "max_instances": 1, "start_timeout_s": 60.0, "source_file": "/f/fn.py",
        "handler": "fn", "has_setup": False, "slo_ttft_s": 2.5, "max_batch": 8, "triggers": [],
        "max_deliver": 5, "results": False, "openai": False, "engine": "shared", "schedule": None,
        "env": {}, "secrets": [], "network": False}


def test_a_well_formed_answer_is_accepted():
    record = FunctionRecord.from_untrusted(GOOD, source_file="/f/fn.py")
    assert record.to_dict() == GOOD and record.deployed is None


@pytest.mark.parametrize("change", [
    {"source_file": "/f/other.py"},        # claims a function of another file
    {"name": "Not A Name"},
    {"max_queue": -5}, {"max_instances": 10**9}, {"max_queue": True},
    {"timeout_s": 0}, {"start_timeout_s": "soon"}, {"timeout_s": 10**400}, {"slo_ttft_s": float("nan")},
    {"backbone": None},                    # an adapter without a backbone
    {"backbone": 42},
    {"extra": 1}, {"openai": "yes"}, {"engine": "gpu"}, {"engine": None},
], ids=str)
def test_malformed_or_forged_answers_are_refused_naming_the_field(change):
    with pytest.raises(SpecError, match=repr(next(iter(change)))):
        FunctionRecord.from_untrusted({**GOOD, **change}, source_file="/f/fn.py")


def test_a_missing_field_or_a_deployed_version_from_outside_is_refused():
    missing = dict(GOOD)
    missing.pop("backbone")
    with pytest.raises(SpecError, match="'backbone' is missing"):
        FunctionRecord.from_untrusted(missing)
    with pytest.raises(SpecError, match="unknown field 'deployed'"):  # only the node sets it
        FunctionRecord.from_untrusted({**GOOD, "deployed": 3})
    with pytest.raises(SpecError, match="a map"):
        FunctionRecord.from_untrusted([GOOD])


@pytest.mark.skipif(os.geteuid() != 0, reason="sandbox uids are used by root nodes only")
async def test_a_second_node_with_no_flags_takes_the_next_free_uid_range(node, client, tmp_path, faas_home):
    """The session node holds a range of 61000-69999 (the first free, 61000-61999 on a
    quiet host): a second one started with no flags serves from another, and the two never
    share a uid; both serve."""
    second = second_node(tmp_path)
    try:
        ours, theirs = uid_range(faas_home / "node.log"), uid_range(tmp_path / "node.log")
        assert theirs[0] % 1000 == 1 and theirs[1] - theirs[0] == 997 and 61000 < theirs[0] < 70000
        assert theirs[1] < ours[0] - 1 or theirs[0] > ours[1] + 1  # no uid in common
        async with Client(second.url) as other:
            for caller in (client, other):
                assert (await caller.invoke("echo", {"text": "hi"})).output["echo"] == {"text": "hi"}
    finally:
        second.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="sandbox uids are used by root nodes only")
def test_a_second_node_with_an_overlapping_uid_range_is_refused(node, tmp_path):
    """The session node holds 61000-61999; 61950-62949 overlaps it."""
    with open(tmp_path / "second.log", "wb") as log:
        second = LocalNode(TEST_FUNCTIONS, state_dir=tmp_path, stderr=log.fileno(),
                           extra_args=("--sandbox-uids", "61950-62949"))
        with pytest.raises(FaasError, match="did not become ready"):
            second.start(ready_timeout_s=60)
    assert "another node on this host uses sandbox uids" in (tmp_path / "second.log").read_text()
