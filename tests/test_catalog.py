"""What the node accepts from discovery (whose answers come from user code) and how it
shares a host with other nodes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from faas import FaasError
from faas.localnode import LocalNode
from runtime.functions.catalog import _valid
from tests.conftest import TEST_FUNCTIONS

GOOD = {"name": "fn", "backbone": "/m", "adapter": "/m/a", "timeout_s": 10.0, "max_queue": 4,
        "max_instances": 1, "start_timeout_s": 60.0, "source_file": "/f/fn.py",
        "handler": "fn", "has_setup": False, "slo_ttft_s": 2.5, "max_batch": 8, "triggers": [],
        "max_deliver": 5, "results": False, "openai": False, "engine": "shared"}


def test_a_well_formed_answer_is_accepted():
    assert _valid(GOOD, Path("/f/fn.py"))


@pytest.mark.parametrize("change", [
    {"source_file": "/f/other.py"},        # claims a function of another file
    {"name": "Not A Name"},
    {"max_queue": -5}, {"max_instances": 10**9}, {"max_queue": True},
    {"timeout_s": 0}, {"start_timeout_s": "soon"},
    {"backbone": None},                    # an adapter without a backbone
    {"backbone": 42},
    {"extra": 1}, {"openai": "yes"}, {"engine": "gpu"}, {"engine": None},
], ids=str)
def test_malformed_or_forged_answers_are_refused(change):
    assert not _valid({**GOOD, **change}, Path("/f/fn.py"))
    missing = dict(GOOD)
    missing.pop("backbone")
    assert not _valid(missing, Path("/f/fn.py"))


@pytest.mark.skipif(os.geteuid() != 0, reason="sandbox uids are used by root nodes only")
def test_a_second_node_with_an_overlapping_uid_range_is_refused(node, tmp_path):
    """The session node holds 61000-61999; 61950-62949 overlaps it."""
    with open(tmp_path / "second.log", "wb") as log:
        second = LocalNode(TEST_FUNCTIONS, state_dir=tmp_path, stderr=log.fileno(),
                           extra_args=("--sandbox-uids", "61950-62949"))
        with pytest.raises(FaasError, match="did not become ready"):
            second.start(ready_timeout_s=60)
    assert "another node on this host uses sandbox uids" in (tmp_path / "second.log").read_text()
