"""Which layers run where: the plan of one prune, decided before any calibration or solve.

Three strategies decide it, each a small object instead of a branch inside the prune:
  resume     the layers already in the resume store (``done``) are not solved again;
  placement  ``OneProcess`` solves every remaining unit; ``Ranks`` (torchrun) gives each rank its share by
             ``shard.assign`` (cost d_out * d_in * b) and has every rank calibrate every remaining unit on its
             share of the windows (the statistics are pooled), keeping those of its own units;
  loading    whole model or layer by layer is the source's strategy (armor_export.source.Loaded), invisible here.
A *unit* is what is solved as one layer: a linear, or a fused group under its fused name
(armor_export.solving.solve_units). Pure functions of names, shapes and sets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from armor_export.shard import DistContext, assign, layer_cost

Units = dict[str, tuple[str, ...]]  # unit name -> member linears, in target order


class Placement(Protocol):
    pooled: bool  # every process calibrates every remaining unit (on its share of the windows)

    def share(self, costs: dict[str, int]) -> list[str]:
        """The units (keys of ``costs``, in their order) this process solves."""


@dataclass(frozen=True)
class OneProcess:
    pooled: bool = False

    def share(self, costs: dict[str, int]) -> list[str]:
        return list(costs)


@dataclass(frozen=True)
class Ranks:
    dist: DistContext
    pooled: bool = True

    def share(self, costs: dict[str, int]) -> list[str]:
        return assign(costs, self.dist.world)[self.dist.rank]


def placement(dist: DistContext) -> Placement:
    return Ranks(dist) if dist.world > 1 else OneProcess()


@dataclass(frozen=True)
class LayerPlan:
    """targets: every target linear; units: what is solved as one layer; done: linears already solved (resume);
    todo: member linears still to solve (all processes); solve: those this process solves; calibrate: the linears
    whose statistics this process collects (one per unit: its first member); keep: those it keeps."""
    targets: list[str]
    units: Units
    done: frozenset[str]
    todo: list[str]
    solve: list[str]
    calibrate: list[str]
    keep: list[str]

    @property
    def resumed(self) -> int:
        return len(self.targets) - len(self.todo)


def first_members(units: Units, names: list[str]) -> list[str]:
    """The first member of every unit holding one of ``names`` (the linear whose statistics stand for the
    unit: a group's members read the same activation), in unit order."""
    wanted = set(names)
    return [ms[0] for ms in units.values() if any(m in wanted for m in ms)]


def plan_layers(targets: list[str], units: Units, done: set[str], shapes: dict[str, tuple[int, int]],
                block_size: int | None, where: Placement) -> LayerPlan:
    """The plan for ``targets`` solved as ``units`` (``shapes``: each unit's stacked (d_out, d_in); ``block_size``:
    the method's b, None when it has no A/B) given the finished linears ``done`` and the placement ``where``."""
    todo_units = [u for u, ms in units.items() if not all(m in done for m in ms)]
    todo = [m for u in todo_units for m in units[u]]
    costs = {u: layer_cost(*shapes[u], block_size) for u in todo_units}
    mine = [m for u in where.share(costs) for m in units[u]]
    keep = first_members(units, mine)
    return LayerPlan(targets, units, frozenset(done), todo, mine,
                     first_members(units, todo) if where.pooled else keep, keep)


def every_layer(targets: list[str]) -> LayerPlan:
    """One process calibrating and solving every target as its own unit, nothing finished before (benchmarks)."""
    return LayerPlan(list(targets), {n: (n,) for n in targets}, frozenset(), list(targets), list(targets),
                     list(targets), list(targets))
