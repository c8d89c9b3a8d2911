"""Distributed solve: which rank solves which layer, and the torch.distributed plumbing.

``torchrun --nproc-per-node N -m armor_export prune ...`` starts N copies of the CLI. Each rank
  1. loads the model and runs the calibration forward passes on its share of the windows
     (``window_share``: whole batches, so every batch is the one a single process would run); after each
     block the statistics are all-reduced (``all_reduce_accumulators``: sums of count-weighted means and
     counts, in fp64) and each rank keeps those of the layers it solves. The pooled mean equals the single
     process's running mean up to rounding (a few fp32 ulps; the tolerance is tested), not bit for bit;
  2. solves the layers ``assign`` gives it, checkpointing each finished chunk into the shared
     resume store (``armor_export.resume``),
  3. meets the others at a barrier; rank 0 then reads every layer from the store and writes the
     artifact.
The assignment is greedy longest-processing-time-first on the cost d_out * d_in * b (ties broken by
target order), so it depends only on the layer list and the world size. Results do not depend on
it: every layer's solve is independent of the other layers in its batch (solver.armor seeds one
generator per layer). Backend: NCCL when the solver runs on CUDA, gloo otherwise.
"""
from __future__ import annotations

import math

import os
from dataclasses import dataclass
from datetime import timedelta

import torch

# Ranks wait at the barrier for the slowest rank's whole solve (hours for a 70B model).
BARRIER_TIMEOUT = timedelta(hours=48)


def layer_cost(d_out: int, d_in: int, block_size: int | None) -> int:
    return d_out * d_in * (block_size or 1)


def assign(costs: dict[str, int], world: int) -> list[list[str]]:
    """Layers per rank (each list in the input order): greedy, most expensive layer first."""
    if world <= 0:
        raise ValueError(f"world size must be > 0, got {world}")
    order = {n: i for i, n in enumerate(costs)}
    load = [0] * world
    shards: list[list[str]] = [[] for _ in range(world)]
    for name in sorted(costs, key=lambda n: (-costs[n], order[n])):
        r = min(range(world), key=lambda k: (load[k], k))
        shards[r].append(name)
        load[r] += costs[name]
    return [sorted(s, key=order.__getitem__) for s in shards]


def window_share(n_windows: int, batch_size: int, rank: int, world: int) -> slice:
    """This rank's windows for calibration: a contiguous run of whole batches of ``batch_size``, the batches
    spread as evenly as possible, earlier ranks first (a late rank gets none when there are fewer batches than
    ranks)."""
    if batch_size <= 0:
        raise ValueError(f"batch size must be > 0, got {batch_size}")
    n_batches = -(-n_windows // batch_size)
    first, stop = -(-n_batches * rank // world), -(-n_batches * (rank + 1) // world)
    return slice(min(first * batch_size, n_windows), min(stop * batch_size, n_windows))


def all_reduce_accumulators(accs: list) -> None:
    """Pool ``solver.stats`` accumulators over every rank, in place: each moment becomes
    sum_r n_r . mean_r / sum_r n_r (computed in fp64, stored back in fp32) and the counts the sums of the
    ranks' counts. Every rank must call it with the same accumulators in the same order."""
    if not accs:
        return
    dist = torch.distributed
    device = accs[0].h.device
    counts = torch.tensor([[a.n, a.dropped] for a in accs], dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    for a, (n, dropped) in zip(accs, counts.tolist()):
        for t in a.moments():
            total = t.to(torch.float64).mul_(a.n)
            dist.all_reduce(total)
            t.copy_(total.div_(n) if n else total)
        a.set_count(n, dropped)


def chunks(names: list[str], shapes: dict[str, tuple], max_chunk: int,
           max_elements: int | None = None) -> list[list[str]]:
    """Split layers into solve calls: same-shaped layers together (ARMOR batches them), at most
    ``max_chunk`` per call and, when given, at most ``max_elements`` weight elements per call (always at
    least one layer), so a chunk's memory does not grow with the model's depth. Each chunk is checkpointed
    as soon as it is solved."""
    groups: dict[tuple, list[str]] = {}
    for n in names:
        groups.setdefault(tuple(shapes[n]), []).append(n)
    out = []
    for shape, group in groups.items():
        size = max_chunk
        if max_elements is not None:
            size = max(1, min(size, max_elements // max(1, math.prod(shape))))
        out.extend(group[i:i + size] for i in range(0, len(group), size))
    return out


def block_elements(shapes: dict[str, tuple], block_of: dict[str, int]) -> int:
    """The weight elements of the largest decoder block (the sum over its layers): the chunk budget that keeps
    a solve call within one block's worth of weights."""
    per: dict[int, int] = {}
    for n, shape in shapes.items():
        per[block_of[n]] = per.get(block_of[n], 0) + math.prod(shape)
    return max(per.values(), default=0)


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_from_env(device: str = "cpu") -> DistContext:
    """A DistContext for this process: world 1 unless started by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    if not torch.distributed.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    cuda = str(device).startswith("cuda")
    if cuda:
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {device} was asked for but no CUDA device is visible")
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    backend = "nccl" if cuda else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=BARRIER_TIMEOUT)
    return DistContext(torch.distributed.get_rank(), torch.distributed.get_world_size(), backend)
