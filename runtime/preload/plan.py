"""The pre-load plan: which level each function's sandbox should be kept at, and which
backbones kept loaded, under a host and a device memory budget. Pure (no I/O).

A precedence-constrained knapsack: pre-loading function f to level L is worth
`chance_f x (TTFT saved at L)` seconds over the horizon and weighs the memory a sandbox
holds at L; a sandbox at ATTACHED or above needs its backbone, which is worth its load
time times the chance that any of its functions is invoked. Solved greedily by value
density, where each candidate move is a whole chain (raising f from its planned level to
L, with the backbone when it is not planned yet), so a cheap prerequisite never hides a
valuable step behind it and precedence holds by construction. A bursty function may get a
2nd, 3rd... sandbox, each worth the chance that so many are needed at once, and each at most
as far up as the one before it. A move must also be worth
its memory: at least `price_s_per_gib_s x GiB x horizon` seconds saved.

What is already loaded counts `HOLD_BONUS` times its value (dropping it and loading it again
later costs the load twice: without this margin a chance hovering at the threshold would
stop and restart sandboxes every second), and a sandbox is never moved down in place: the
plan keeps a function at the level it holds, or drops it altogether.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from runtime.memory.budget import Budget
from runtime.proc.usage import GIB
from runtime.sandbox.levels import STEPS, Level, LevelProfile

HOLD_BONUS = 2.0


@dataclass(frozen=True)
class Demand:
    """One function as the planner sees it."""

    function: str
    backbone: str | None
    chance: float  # of an invocation within the horizon
    serving: bool = False  # a sandbox of it is busy (it covers the first planned one): its backbone is in use
    held: Level = Level.COLD  # how far its idle sandbox is loaded now
    # Chances that a 2nd, 3rd... sandbox is needed at once within the horizon (bursts).
    extra: tuple[float, ...] = ()


@dataclass
class Plan:
    levels: dict[str, Level]  # of each function's first sandbox
    extra: dict[str, list[Level]]  # of its 2nd, 3rd... (never above the one before)
    backbones: set[str]  # kept loaded for the plan (those in use are not counted here)
    values: dict[str, float]  # expected seconds of TTFT saved, per function (and backbone)
    host_bytes: int = 0
    device_bytes: int = 0
    order: list[str] = field(default_factory=list)  # functions, most valuable move first


@dataclass(frozen=True)
class _Move:
    density: float
    value: float
    function: str | None  # None: the backbone alone
    level: Level
    backbone: str | None  # planned by this move
    host: int
    device: int
    instance: int = 0  # 0: the function's first sandbox; k: its (k+1)-th


def make_plan(demands: Iterable[Demand], profile: Callable[[str | None], LevelProfile],
              budget: Budget, horizon_s: float, price_s_per_gib_s: float,
              held_backbones: frozenset[str] = frozenset()) -> Plan:
    """The plan for `demands`; `held_backbones` are those loaded now."""
    demands = list(demands)
    plan = Plan(levels={d.function: Level.COLD for d in demands},
                extra={d.function: [Level.COLD] * len(d.extra) for d in demands},
                backbones=set(), values={})
    in_use = {d.backbone for d in demands if d.serving and d.backbone is not None}
    backbone_value = {model: value * (HOLD_BONUS if model in held_backbones else 1.0)
                      for model, value in _backbone_values(demands, profile).items()}

    def gain(chance: float, p: LevelProfile, low: Level, high: Level, held: Level) -> float:
        return chance * sum((p.saved(step) - p.saved(Level(step - 1)))
                            * (HOLD_BONUS if step <= held else 1.0)
                            for step in STEPS if low < step <= high)

    def fits(host: int, device: int) -> bool:
        return (plan.host_bytes + host <= budget.host_bytes
                and plan.device_bytes + device <= budget.device_bytes)

    def weight(host: int, device: int) -> float:
        # Each budget's share, so a move that fills the scarcer one weighs more.
        return (host / max(budget.host_bytes, 1)) + (device / max(budget.device_bytes, 1))

    def worth(value: float, host: int, device: int) -> bool:
        return value > 0 and value >= price_s_per_gib_s * (host + device) / GIB * horizon_s

    def moves() -> Iterable[_Move]:
        for model in {d.backbone for d in demands if d.backbone is not None} - in_use - plan.backbones:
            p = profile(model)
            host, device = p.backbone_bytes, p.backbone_device_bytes
            if fits(host, device) and worth(backbone_value[model], host, device):
                yield _Move(backbone_value[model] / max(weight(host, device), 1e-12),
                            backbone_value[model], None, Level.COLD, model, host, device)
        for d in demands:
            p = profile(d.backbone)
            now = plan.levels[d.function]
            held_host, held_device = p.held(now)
            for level in STEPS:
                if level <= now:
                    continue
                host, device = p.held(level)
                host, device = host - held_host, device - held_device
                value = gain(d.chance, p, now, level, d.held)
                needs = (d.backbone if d.backbone is not None and level >= Level.ATTACHED
                         and d.backbone not in in_use | plan.backbones else None)
                if needs is not None:
                    host, device = host + p.backbone_bytes, device + p.backbone_device_bytes
                    value += backbone_value[needs]
                if fits(host, device) and worth(value, host, device):
                    yield _Move(value / max(weight(host, device), 1e-12), value, d.function,
                                level, needs, host, device)
            # Burst sandboxes: each at most as far as the one before (which holds the backbone).
            levels = [plan.levels[d.function], *plan.extra[d.function]]
            for k, chance in enumerate(d.extra):
                now = levels[k + 1]
                held_host, held_device = p.held(now)
                for level in STEPS:
                    if not now < level <= levels[k]:
                        continue
                    host, device = p.held(level)
                    host, device = host - held_host, device - held_device
                    value = gain(chance, p, now, level, Level.COLD)
                    if fits(host, device) and worth(value, host, device):
                        yield _Move(value / max(weight(host, device), 1e-12), value, d.function,
                                    level, None, host, device, k + 1)

    while True:
        best = max(moves(), key=lambda m: m.density, default=None)
        if best is None:
            break
        if best.backbone is not None:
            plan.backbones.add(best.backbone)
            plan.values[best.backbone] = backbone_value[best.backbone]
        if best.function is not None:
            own = best.value - (backbone_value[best.backbone] if best.backbone else 0.0)
            if best.instance:
                plan.extra[best.function][best.instance - 1] = best.level
            else:
                plan.levels[best.function] = best.level
            plan.values[best.function] = plan.values.get(best.function, 0.0) + own
            if best.function not in plan.order:
                plan.order.append(best.function)
        plan.host_bytes += best.host
        plan.device_bytes += best.device
    for levels in plan.extra.values():
        while levels and levels[-1] == Level.COLD:
            levels.pop()
    for d in demands:  # kept, not moved down in place (it may then exceed the budget)
        if Level.COLD < plan.levels[d.function] < d.held:
            p = profile(d.backbone)
            (low_host, low_device), (host, device) = p.held(plan.levels[d.function]), p.held(d.held)
            plan.levels[d.function] = d.held
            plan.host_bytes += host - low_host
            plan.device_bytes += device - low_device
            if (d.backbone is not None and d.held >= Level.ATTACHED
                    and d.backbone not in in_use | plan.backbones):
                plan.backbones.add(d.backbone)  # it maps it: precedence holds
                plan.values[d.backbone] = backbone_value[d.backbone]
                plan.host_bytes += p.backbone_bytes
                plan.device_bytes += p.backbone_device_bytes
    return plan


def _backbone_values(demands: list[Demand], profile: Callable[[str | None], LevelProfile]
                     ) -> dict[str, float]:
    """A loaded backbone saves its load time to the first request of any of its functions."""
    none_invoked: dict[str, float] = {}
    for d in demands:
        if d.backbone is not None:
            none_invoked[d.backbone] = none_invoked.get(d.backbone, 1.0) * (1.0 - d.chance)
    return {model: profile(model).backbone_seconds * (1.0 - q) for model, q in none_invoked.items()}
