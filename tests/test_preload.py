"""Pre-loading: the predictors and the planner on synthetic histories with known answers,
and a sandbox prepared to a level serving its first request from there."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from runtime.memory.budget import Budget
from runtime.preload.plan import Demand, make_plan
from runtime.preload.predict import HybridHistogram, RateEstimate, followers
from runtime.proc.usage import GIB, MIB
from runtime.sandbox.levels import STEPS, Cost, Level, LevelProfile
from tests.conftest import nodes_of

PERIOD = 60.0
HORIZON = 5.0


def periodic(n: int = 30, period: float = PERIOD, start: float = 1000.0) -> list[float]:
    return [start + i * period for i in range(n)]


def profile(device: bool = False) -> LevelProfile:
    """Known costs: each step 0.5 s; a sandbox holds 100/200/300/400 MiB at the levels."""
    steps = {step: Cost(0.5, 0 if device and step >= Level.ATTACHED else (i + 1) * 100 * MIB,
                        (i + 1) * 100 * MIB if device and step >= Level.ATTACHED else 0)
             for i, step in enumerate(STEPS)}
    return LevelProfile(steps=steps, backbone_seconds=3.0,
                        backbone_bytes=0 if device else 1000 * MIB,
                        backbone_device_bytes=1000 * MIB if device else 0)


def test_histogram_expects_a_periodic_function_just_before_its_period():
    arrivals = periodic()
    last = arrivals[-1]
    histogram = HybridHistogram()
    chances = {idle: histogram.predict(arrivals, last + idle, HORIZON).chance
               for idle in (1, 10, 30, 50, 55.5, 56, 58)}
    assert max(chances[1], chances[10], chances[30], chances[50]) < 0.01
    assert min(chances[56], chances[58]) > 0.9
    assert 0.4 < chances[55.5] < 0.6  # the horizon reaches half into the period's bin
    # The paper's windows: pre-warm at 90% of the 5th percentile, keep until 110% of the 99th.
    assert "windows 54-67.1s" in histogram.predict(arrivals, last + 56, HORIZON).why


def test_histogram_falls_back_to_keep_alive_with_little_history_and_to_rate_beyond_it():
    histogram = HybridHistogram(min_samples=5, fallback_keep_alive_s=30)
    few = [100.0, 110.0, 120.0]
    assert histogram.predict(few, 140.0, HORIZON).chance == 1.0
    assert histogram.predict(few, 151.0, HORIZON).chance == 0.0
    assert "keep-alive 30s" in histogram.predict(few, 140.0, HORIZON).why
    arrivals = periodic()
    beyond = histogram.predict(arrivals, arrivals[-1] + 5 * PERIOD, HORIZON)
    rate = RateEstimate().predict(arrivals, arrivals[-1] + 5 * PERIOD, HORIZON)
    assert beyond.chance == rate.chance and "beyond every gap" in beyond.why


def test_rate_estimate_is_poisson_at_the_recent_rate():
    arrivals = [float(t) for t in range(0, 200, 10)]  # 20 arrivals, one per 10 s
    prediction = RateEstimate(window=20).predict(arrivals, 200.0, HORIZON)
    assert prediction.chance == pytest.approx(1 - math.exp(-20 / 200 * HORIZON))
    assert RateEstimate().predict([], 0.0, HORIZON).chance == 0.0


def test_plan_pre_warms_a_periodic_function_only_just_before_its_period():
    arrivals = periodic()
    histogram = HybridHistogram()
    levels = {}
    for idle in (10, 30, 57):
        chance = histogram.predict(arrivals, arrivals[-1] + idle, HORIZON).chance
        plan = make_plan([Demand("tick", "base", chance)], lambda _m: profile(), Budget(8 * GIB),
                         HORIZON, price_s_per_gib_s=0.1)
        levels[idle] = plan.levels["tick"]
        assert (plan.backbones == {"base"}) == (plan.levels["tick"] >= Level.ATTACHED)
    assert levels == {10: Level.COLD, 30: Level.COLD, 57: Level.LOADED}


def test_plan_respects_the_budget_and_prefers_the_likelier_function():
    demands = [Demand(f"fn{i}", "base", chance) for i, chance in enumerate((0.2, 0.9, 0.5, 0.7))]
    budget = Budget(1000 * MIB + 400 * MIB + 100 * MIB)  # backbone, one LOADED, one SPAWNED
    plan = make_plan(demands, lambda _m: profile(), budget, HORIZON, price_s_per_gib_s=0.0)
    held = sum(profile().held(level)[0] for level in plan.levels.values())
    assert held + (1000 * MIB if plan.backbones else 0) <= budget.host_bytes
    assert plan.levels["fn1"] == Level.LOADED  # the likeliest gets the most
    assert plan.order[0] == "fn1"
    assert sum(level > Level.COLD for level in plan.levels.values()) == 2


def test_plan_never_attaches_without_the_backbone():
    for held in (Level.COLD, Level.LOADED):
        demands = [Demand(f"fn{i}", "base", 0.3, held=held) for i in range(6)]
        for host_mib in range(0, 4000, 250):
            plan = make_plan(demands, lambda _m: profile(), Budget(host_mib * MIB), HORIZON, 0.0)
            attached = [f for f, level in plan.levels.items() if level >= Level.ATTACHED]
            assert not attached or plan.backbones == {"base"}
            if held == Level.COLD:  # (what is held may be kept beyond the budget)
                assert plan.host_bytes <= host_mib * MIB


def test_plan_uses_a_backbone_in_use_for_free():
    demands = [Demand("busy", "base", 0.0, serving=True), Demand("next", "base", 0.5)]
    budget = Budget(400 * MIB)  # one LOADED sandbox, no room for a backbone
    plan = make_plan(demands, lambda _m: profile(), budget, HORIZON, 0.0)
    assert plan.levels == {"busy": Level.COLD, "next": Level.LOADED}
    assert plan.backbones == set()  # in use already: not the plan's to pin


def test_followers_measure_how_bursty_a_function_is():
    bursts = [t + d for t in range(0, 600, 60) for d in (0.0, 0.5, 1.0)]  # 3 at once, every minute
    assert followers(bursts, 5.0) == pytest.approx((2 / 3, 1 / 3))
    assert followers(periodic(), 5.0) == ()
    # Sandboxes that take two requests at a time: three at once need a second one only.
    assert followers(bursts, 5.0, per=2) == pytest.approx((1 / 3,))
    assert followers(bursts, 5.0, per=3) == ()


def test_plan_gives_a_bursty_function_more_sandboxes_within_the_budget():
    chance = 0.9
    demands = [Demand("bursty", "base", chance, extra=(chance * 2 / 3, chance * 1 / 3)),
               Demand("steady", "base", chance)]
    roomy = make_plan(demands, lambda _m: profile(), Budget(8 * GIB), HORIZON, 0.1)
    assert roomy.levels["bursty"] == Level.LOADED and len(roomy.extra["bursty"]) == 2
    assert roomy.extra["bursty"][0] >= roomy.extra["bursty"][1] > Level.COLD
    assert roomy.extra["steady"] == []
    budget = Budget(1000 * MIB + 2 * 400 * MIB + 100 * MIB)  # the backbone, 2 LOADED, 1 SPAWNED
    tight = make_plan(demands, lambda _m: profile(), budget, HORIZON, 0.1)
    held = sum(profile().held(level)[0] for level in [*tight.levels.values(), *tight.extra["bursty"]])
    assert held + 1000 * MIB == tight.host_bytes <= budget.host_bytes
    assert (tight.levels["bursty"], tight.levels["steady"]) == (Level.LOADED, Level.LOADED)
    assert tight.extra["bursty"] == [Level.SPAWNED]


def test_device_and_host_budgets_are_separate():
    demands = [Demand("gpu-fn", "base", 1.0)]
    host_only = make_plan(demands, lambda _m: profile(device=True), Budget(8 * GIB, 0), HORIZON, 0.0)
    assert host_only.levels["gpu-fn"] == Level.SPAWNED  # anything above needs device memory
    both = make_plan(demands, lambda _m: profile(device=True), Budget(8 * GIB, 2 * GIB), HORIZON, 0.0)
    assert both.levels["gpu-fn"] == Level.LOADED and both.device_bytes <= 2 * GIB


def test_plan_holds_nothing_that_is_not_worth_its_memory():
    demands = [Demand("rare", "base", 0.001), Demand("never", "base", 0.0)]
    trimmed = profile()  # measured after the heap was trimmed: less than the level below
    trimmed.steps[Level.LOADED] = Cost(0.5, 50 * MIB)
    for p in (profile(), trimmed):
        plan = make_plan(demands, lambda _m, p=p: p, Budget(64 * GIB), HORIZON, price_s_per_gib_s=0.1)
        assert set(plan.levels.values()) == {Level.COLD} and not plan.backbones


def test_plan_keeps_what_is_loaded_until_its_chance_falls_well_below_the_threshold():
    """Hysteresis: each step here is worth its memory from a chance of about 0.49; what a
    function already holds stays until the chance falls under half that."""
    def plan_for(chance: float, held: Level) -> Level:
        demands = [Demand("busy", "base", 0.0, serving=True),  # the backbone is in use
                   Demand("fn", "base", chance, held=held)]
        return make_plan(demands, lambda _m: profile(), Budget(8 * GIB), HORIZON, 0.5).levels["fn"]

    assert plan_for(0.6, Level.COLD) == Level.LOADED
    assert plan_for(0.35, Level.COLD) == Level.COLD
    assert plan_for(0.35, Level.LOADED) == Level.LOADED
    assert plan_for(0.2, Level.LOADED) == Level.COLD


def test_plan_never_moves_a_sandbox_down_in_place():
    heavy_load = profile()
    heavy_load.steps[Level.LOADED] = Cost(0.5, 3000 * MIB)  # loading costs a lot of memory
    demands = [Demand("busy", "base", 0.0, serving=True), Demand("fn", "base", 0.5, held=Level.LOADED)]
    plan = make_plan(demands, lambda _m: heavy_load, Budget(8 * GIB), HORIZON, 0.5)
    assert plan.levels["fn"] == Level.LOADED  # the plan alone would stop at STAGED
    assert plan.host_bytes == 3000 * MIB


@pytest.mark.parametrize("path", ["engine", "sandbox"])
@pytest.mark.parametrize("prepared_level", [Level.SPAWNED, Level.ATTACHED, Level.STAGED],
                         ids=lambda level: level.label)
async def test_a_request_finds_the_level_its_sandbox_was_prepared_to(models, prepared_level, path):
    """Prepared to a level below LOADED, the sandbox finishes loading for the request,
    which says what it found, and answers exactly like plain transformers + peft."""
    from bench.levels import node_parts, prepared
    from faas.bundled import adapter_path, model_path
    from runtime.sandbox.levels import Profiles
    from tests.conftest import EXAMPLES
    from tests.reference import example_prompt, greedy_token_ids

    async with node_parts(EXAMPLES, "cpu") as parts:
        profiles = Profiles()
        pool = parts.pool("support", profiles, engine=path == "engine")
        try:
            await prepared(pool, prepared_level)
            event = {"message": "Where is my refund?", "max_new_tokens": 8}
            pool.admit()
            served = await pool.serve("req-1", event, time.monotonic() + 120)
            assert served.level == prepared_level
            prompt = example_prompt("support", event, model_path())
            assert served.result.output["token_ids"] == greedy_token_ids(
                model_path(), adapter_path("support"), prompt, 8)
            assert pool.state()["levels"] == ["loaded"]
            measured = profiles.of(pool.profile_key).steps
            assert all(measured[step].samples >= 1 for step in STEPS)
            assert measured[Level.LOADED].host_bytes > 0
            pool.admit()
            assert (await pool.serve("req-2", event, time.monotonic() + 120)).level == Level.LOADED
        finally:
            await pool.close()

async def test_a_restarted_node_pre_loads_what_the_shared_history_predicts(models, tmp_path):
    """The history is in JetStream: a node started again on the same server predicts from
    what the first one served, pre-loads it before any request, and `faas ls` says why."""
    from faas import Client
    from runtime.sandbox.levels import engine_key
    from tests.conftest import second_node

    event = {"text": "The parcel arrived.", "max_words": 5, "max_new_tokens": 4}
    node = second_node(tmp_path)
    try:
        async with Client(node.url) as client:
            for _ in range(2):
                await client.invoke("summarize", event, timeout_s=120)
    finally:
        node.stop()
    node = second_node(tmp_path)
    try:
        async with Client(node.url) as client:
            deadline = time.monotonic() + 90
            while True:
                [listing] = await nodes_of(node)
                functions = {f["name"]: f for f in listing["functions"]}
                if functions["summarize"]["levels"] == ["loaded"] and not functions["summarize"]["starting"]:
                    break
                assert time.monotonic() < deadline, functions["summarize"]
                await asyncio.sleep(0.2)
            summarize = functions["summarize"]
            assert (summarize["planned"], summarize["chance"]) == ("loaded", 1.0)
            assert "1 gaps: keep-alive" in summarize["why"]  # too little history: the fallback
            assert (functions["sql"]["planned"], functions["sql"]["levels"]) == ("cold", [])
            assert listing["preload"]["shared_history"] is True
            # What it pins for an engine function is the engine (not only the weights): it
            # outlives its keep-alive while the plan wants it.
            [engine] = listing["engines"]
            assert listing["preload"]["backbones"] == [engine_key(engine["model"])]
            assert engine["users"] == 2  # the plan's pin and the sandbox's connection
            result = await client.invoke("summarize", event, timeout_s=120)
            assert result.metrics["level"] == "loaded"
    finally:
        node.stop()


async def test_pool_prepares_burst_sandboxes_trims_extras_and_gives_up_after_a_failed_start(models):
    """The pool's handles for the plan, with real sandboxes of plain functions: prepare
    starts what is planned (a busy sandbox covers the first), trim stops the extras once
    idle past their keep-alive and everything for COLD, and a function whose start failed
    is not pre-loaded again."""
    from bench.levels import node_parts
    from runtime.pool.leases import FunctionPool
    from tests.conftest import EXAMPLES, TEST_FUNCTIONS

    async def settled(pool: FunctionPool) -> dict:
        while pool.climbing:
            await asyncio.sleep(0.02)
        return pool.state()

    async with node_parts(EXAMPLES, "cpu") as parts:
        pool = parts.pool("echo", max_instances=3)
        try:
            assert pool.prepare([Level.LOADED, Level.LOADED, Level.SPAWNED], most=2) == 2
            assert (await settled(pool))["levels"] == ["loaded", "loaded"]
            assert pool.prepare([Level.LOADED, Level.LOADED, Level.SPAWNED], most=2) == 1
            assert sorted((await settled(pool))["levels"]) == ["loaded", "loaded", "spawned"]
            assert pool.trim([Level.LOADED], extra_keep_alive_s=60) == 0  # extras still kept
            assert pool.trim([Level.LOADED], extra_keep_alive_s=0) == 2
            assert pool.state()["levels"] == ["loaded"]
            pool.admit()
            serving = asyncio.create_task(pool.serve("r", {"x": 1}, time.monotonic() + 30))
            await asyncio.sleep(0)
            assert pool.prepare([Level.LOADED, Level.LOADED], most=2) == 1  # the busy one covers one
            await serving
            assert (await settled(pool))["levels"] == ["loaded", "loaded"]
            assert pool.trim([Level.COLD], extra_keep_alive_s=60) == 2
            while pool.instances:
                await asyncio.sleep(0.02)
        finally:
            await pool.close()
    async with node_parts(TEST_FUNCTIONS, "cpu") as parts:
        pool = parts.pool("stuck-setup")
        try:
            assert pool.prepare([Level.LOADED], most=1) == 1
            while pool.instances:  # killed after its start_timeout_s
                await asyncio.sleep(0.05)
            assert pool.prepare([Level.LOADED], most=1) == 0
        finally:
            await pool.close()
