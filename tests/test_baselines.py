"""The classic serverless baseline's platform model: instances reserve memory out of a fixed
capacity; a request takes an idle instance of its function, else starts one if it fits,
else evicts the least recently used idle instance of another function, else waits for an
instance to free up. (Real processes stand in for instances: `sleep`.)"""

from __future__ import annotations

import asyncio

import pytest

from bench.modes import ClassicServerless, ModeConfig, _Instance
from faas import Overloaded


class Platform(ClassicServerless):
    """Cold starts are a `sleep` process: the platform's bookkeeping is what is tested."""

    async def _cold(self, function: str) -> _Instance:
        instance = _Instance(await asyncio.create_subprocess_exec("sleep", "60"), function)
        async with self.room:
            self.live.add(instance)
        return instance


async def platform_with(tmp_path, idle: dict[str, list[float]], busy: list[str] = (),
                        capacity_gib: float = 3) -> tuple[Platform, dict[float, _Instance]]:
    """A platform whose instances reserve 1 GiB each, with idle instances (function ->
    their idle-since times) and busy ones."""
    model = tmp_path / "model"
    model.mkdir(exist_ok=True)
    config = ModeConfig(model_dir=model, names=["f0", "f1", "f2"], workdir=tmp_path,
                        keep_alive_s=60, capacity_gib=capacity_gib)
    platform = Platform(config, staged=False)
    platform.instance_bytes = 2**30
    by_since = {}
    for function, times in idle.items():
        for since in times:
            instance = await platform._cold(function)
            instance.idle_since = since
            platform.idle[function].append(instance)
            by_since[since] = instance
    for function in busy:
        await platform._cold(function)
    return platform, by_since


async def stop(platform: Platform) -> None:
    for instance in list(platform.live):
        await instance.kill()


async def test_idle_instance_of_the_function_is_taken_warm(tmp_path):
    platform, idle = await platform_with(tmp_path, {"f0": [1.0], "f1": [2.0, 3.0]})
    try:
        instance, level = await platform._acquire("f1")
        assert level == "loaded" and instance in (idle[2.0], idle[3.0])
        assert platform.evictions == 0
    finally:
        await stop(platform)


async def test_cold_start_that_does_not_fit_evicts_the_least_recently_used_idle(tmp_path):
    platform, idle = await platform_with(tmp_path, {"f0": [5.0, 1.0], "f1": [3.0]})
    try:
        instance, level = await platform._acquire("f2")
        assert level == "cold" and instance.function == "f2"
        assert platform.evictions == 1
        assert idle[1.0] not in platform.live and idle[1.0].proc.returncode is not None
        assert {idle[5.0], idle[3.0], instance} == platform.live
    finally:
        await stop(platform)


async def test_cold_start_waits_while_every_instance_is_busy_and_takes_its_own(tmp_path):
    platform, _ = await platform_with(tmp_path, {}, busy=["f0", "f1", "f1"])
    try:
        acquiring = asyncio.create_task(platform._acquire("f1"))
        await asyncio.sleep(0.3)
        assert not acquiring.done()  # full, and nothing idle to evict
        freed = next(i for i in platform.live if i.function == "f1")
        async with platform.room:  # one of its own function finishes its request
            freed.idle_since = 1.0
            platform.idle["f1"].append(freed)
            platform.room.notify_all()
        instance, level = await asyncio.wait_for(acquiring, 5)
        assert (instance, level) == (freed, "loaded") and platform.evictions == 0
    finally:
        await stop(platform)


async def test_concurrent_cold_starts_never_exceed_the_capacity(tmp_path):
    platform, _ = await platform_with(tmp_path, {})
    try:
        done, pending = await asyncio.wait(
            [asyncio.create_task(platform._acquire(f)) for f in ("f0", "f1", "f2", "f0")],
            timeout=1.0)
        assert len(done) == 3 and len(pending) == 1 and len(platform.live) == 3
        for task in pending:
            task.cancel()
    finally:
        await stop(platform)


async def test_an_instance_larger_than_the_capacity_is_refused_not_awaited(tmp_path):
    platform, _ = await platform_with(tmp_path, {}, capacity_gib=0.5)
    with pytest.raises(Overloaded, match="does not fit"):
        await asyncio.wait_for(platform._acquire("f0"), 5)
