"""The plan of a prune (armor_export.plan): which layers run where under resume, one process or ranks, fused units."""
from __future__ import annotations

from armor_export.plan import OneProcess, Ranks, every_layer, placement, plan_layers
from armor_export.shard import DistContext, assign, layer_cost
from armor_export.solving import solve_units, stats_names

NAMES = ["l0.q", "l0.k", "l0.v", "l0.o", "l0.up", "l0.down", "l1.q", "l1.k", "l1.v", "l1.o", "l1.up", "l1.down"]
SHAPE = {"q": (64, 64), "k": (16, 64), "v": (16, 64), "o": (64, 64), "up": (128, 64), "down": (64, 128)}
GROUPS = {f"l{i}.qkv": (f"l{i}.q", f"l{i}.k", f"l{i}.v") for i in (0, 1)}


def _shapes(units):
    return {u: (sum(SHAPE[m.split(".")[1]][0] for m in ms), SHAPE[ms[0].split(".")[1]][1]) for u, ms in units.items()}


def test_one_process_solves_and_calibrates_what_is_not_done():
    units = solve_units(NAMES, GROUPS)
    done = {"l0.o", "l1.q", "l1.k", "l1.v"}  # a whole group finished, and one linear
    p = plan_layers(NAMES, units, done, _shapes(units), 8, OneProcess())
    todo = [n for n in NAMES if n not in done]
    assert p.todo == p.solve == todo and p.resumed == 4
    assert p.calibrate == p.keep == stats_names(todo, GROUPS) == ["l0.q", "l0.up", "l0.down", "l1.o", "l1.up",
                                                                  "l1.down"]
    nothing = plan_layers(NAMES, units, set(NAMES), _shapes(units), 8, OneProcess())
    assert nothing.todo == nothing.solve == nothing.calibrate == [] and nothing.resumed == len(NAMES)


def test_a_partly_done_group_is_solved_again_whole():
    units = solve_units(NAMES, GROUPS)
    p = plan_layers(NAMES, units, {"l0.q"}, _shapes(units), 8, OneProcess())
    assert p.solve[:3] == ["l0.q", "l0.k", "l0.v"] and p.resumed == 0


def test_ranks_split_the_solve_and_pool_the_calibration():
    units = solve_units(NAMES, GROUPS)
    shapes = _shapes(units)
    plans = [plan_layers(NAMES, units, {"l1.o"}, shapes, 8, placement(DistContext(r, 3))) for r in range(3)]
    assert all(isinstance(placement(DistContext(r, 3)), Ranks) for r in range(3))
    assert isinstance(placement(DistContext()), OneProcess)
    solved = [n for p in plans for n in p.solve]
    assert sorted(solved) == sorted(n for n in NAMES if n != "l1.o") and len(solved) == len(set(solved))
    costs = {u: layer_cost(*shapes[u], 8) for u in units if u != "l1.o"}
    for r, p in enumerate(plans):
        assert p.solve == [m for u in assign(costs, 3)[r] for m in units[u]]
        assert p.calibrate == stats_names(p.todo, GROUPS)  # every rank: the same list, all units still to solve
        assert p.keep == stats_names(p.solve, GROUPS)
    assert plans[0].calibrate == plans[1].calibrate == plans[2].calibrate


def test_every_layer_is_one_process_with_nothing_done():
    units = {n: (n,) for n in NAMES}
    assert every_layer(NAMES) == plan_layers(NAMES, units, set(), _shapes(units), None, OneProcess())
