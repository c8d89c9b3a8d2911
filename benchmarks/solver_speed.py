"""ARMOR solver speed: our batched analytic BCD against an official-style reference step.

Run:  python -m benchmarks.solver_speed [--smoke] [--iters N] [--out results.json] [--whole-model]

The reference (kept here, not in the library) follows the official formulation of one iteration
(armor-algorithm.md section 9): autograd Adam on (A, B, V) with torch.optim.Adam, a second full
forward/backward for the selection gradient (also into A and B), a forward of A S_{-g} B for the
residual of the selected groups, and a forward for the loss: 16 block-diagonal products. Selection
(same per-layer generator, same sampling) and the 2x2 group solves use the library's functions, so
the two differ only in how the products and gradients are computed; the benchmark checks that they
reach the same loss after the same number of steps.

The speed-up compares one iteration of each with one sparse-core round (the official step); the cpu preset's
iteration (several rounds) is timed too and gives the whole-model projection.

Ours (solver.armor) needs 6 products per iteration, no autograd, a hand-written Adam, and solves all
same-shaped layers of the model in one batch. Weights: SmolLM2-135M from the bundled GGUF when
available (--real), else random; h is synthetic positive (log-normal channel energies).
Prints a table, then one JSON line; --out writes the JSON to a file.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from solver import armor
from solver.bcd_objective import to_cols
from solver.bcd_state import LayerStart, init_state
from solver.blockdiag import left_mul, right_mul
from solver.config import PRESETS, SolverConfig
from solver.core_step import group_scores, select, solve_patterns
from solver.methods import Problem
from solver.stats import LayerStats

SHAPES = {"q/o": (576, 576, 60), "k/v": (192, 576, 60), "gate/up": (1536, 576, 60), "down": (576, 1536, 30)}
NAMES = {"q/o": ("q_proj", "o_proj"), "k/v": ("k_proj", "v_proj"), "gate/up": ("gate_proj", "up_proj"),
         "down": ("down_proj",)}


def synthetic_h(d_in: int, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.randn(d_in, generator=gen)) + 1e-3


def real_weights() -> dict[str, list[torch.Tensor]]:
    """Every linear of SmolLM2-135M grouped by SHAPES key (q and o together, etc.)."""
    from armor_export.models import load_model, resolve_model

    model, _, _ = load_model(resolve_model(None))  # the embedded default, via its cached HF folder
    out = {k: [] for k in SHAPES}
    for layer in model.model.layers:
        mods = {**vars(layer.self_attn)["_modules"], **vars(layer.mlp)["_modules"]}
        for key, names in NAMES.items():
            out[key] += [mods[n].weight.detach().float().clone() for n in names]
    return out


class Reference:
    """Official-style iteration on one layer (autograd + torch.optim.Adam + 4 forwards)."""

    def __init__(self, start: LayerStart, cfg: SolverConfig):
        self.b, self.cfg = cfg.block_size, cfg
        self.W, self.h, self.M = start.W_bar, start.h, start.M.clone()
        self.A = start.A.clone().requires_grad_()
        self.B = start.B.clone().requires_grad_()
        self.V = start.S.clone().requires_grad_()
        self.Z = float((self.W.pow(2) * self.h).sum())
        self.opt = torch.optim.Adam([self.A, self.B, self.V], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    def loss(self, A, S, B):
        return ((self.W - left_mul(A, right_mul(S, B))).pow(2) * self.h).sum() / self.Z

    def step(self) -> float:
        b, W, h = self.b, self.W, self.h
        self.opt.zero_grad()
        self.loss(self.A, self.V * self.M, self.B).backward()
        self.opt.step()
        S = (self.V * self.M).detach().requires_grad_()
        self.loss(self.A, S, self.B).backward()  # full backward, also into A and B (official)
        Gamma = S.grad
        d_out, d_in = W.shape
        n0, n1, g4 = d_out // b, d_in // b, b // 4
        rand = torch.rand(n0, n1, generator=self.gen)
        cand, _ = select(group_scores(to_cols(Gamma[None], b), b), rand[None], self.cfg.selection)
        ii, gg = (cand[0] // g4), (cand[0] % g4)
        pp, qq = torch.arange(n0)[:, None], torch.arange(n1)[None, :]
        with torch.no_grad():
            A, B, V = self.A.detach(), self.B.detach(), self.V.detach()
            S6 = S.detach().clone().view(n0, b, n1, g4, 4)
            s_old = S6[pp, ii, qq, gg].clone()
            S6[pp, ii, qq, gg] = 0.0
            R = (left_mul(A, right_mul(S6.view(d_out, d_in), B)) - W) * h.sqrt()  # A S_{-g} B residual
            R5 = R.view(n0, b, n1, b)
            a = A[pp, :, ii]  # [n0, n1, b]
            Gg = B.view(n1, g4, 4, b)[qq, gg] * h.sqrt().view(n1, b)[qq][..., None, :]  # [n0, n1, 4, b]
            Rta = torch.einsum("pjqm,pqj->pqm", R5, a)
            u = torch.einsum("pqfm,pqm->pqf", Gg, Rta)
            Q = Gg @ Gg.transpose(-1, -2)
            s_new, pat, accept, _, _ = solve_patterns(Q, u, a.pow(2).sum(-1), s_old)
            m_new = torch.zeros(n0, n1, 4, dtype=torch.bool)
            m_new.scatter_(-1, torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])[pat], True)
            M6, V6 = self.M.view(n0, b, n1, g4, 4), V.view(n0, b, n1, g4, 4)
            m_new = torch.where(accept[..., None], m_new, M6[pp, ii, qq, gg])
            M6[pp, ii, qq, gg] = m_new
            V6[pp, ii, qq, gg] = torch.where(m_new, s_new.float(), V6[pp, ii, qq, gg])
            return float(self.loss(A, V * self.M, B))  # loss evaluation forward


def _clock(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def time_interleaved(Ws, hs, cpu: SolverConfig, iters: int, preset: SolverConfig):
    """Median (wall, CPU) ms per iteration per layer of the reference, of ours on the same step (one
    sparse-core round) and of ours at the preset (``preset.sparse_rounds`` rounds), interleaved step by
    step so all see the same load from other processes. Ours runs solver.armor.bcd_iteration on one
    batch of the size solve_layers uses for this shape (the per-layer cost is the batch's / K)."""
    d_out, d_in = Ws[0].shape
    K = len(armor.batches(list(range(len(Ws))), min(cpu.max_batch, armor.BATCH_ELEMS // (d_out * d_in)))[0])
    starts = [armor.prepare(f"l{i}", W, h, cpu.block_size) for i, (W, h) in enumerate(zip(Ws[:K], hs[:K]))]
    st = init_state(starts, cpu.block_size, torch.device("cpu"))
    gens = [torch.Generator().manual_seed(cpu.seed) for _ in range(K)]
    st_p = init_state(starts, preset.block_size, torch.device("cpu"))
    gens_p = [torch.Generator().manual_seed(cpu.seed) for _ in range(K)]
    ref = Reference(starts[0], cpu)
    ref.step()  # warm-up
    armor.bcd_iteration(st, gens, 1, cpu)
    armor.bcd_iteration(st_p, gens_p, 1, preset)
    r, o, p = [], [], []
    for t in range(iters):
        r.append(_clock(ref.step))
        o.append(_clock(lambda: armor.bcd_iteration(st, gens, t + 2, cpu)))
        p.append(_clock(lambda: armor.bcd_iteration(st_p, gens_p, t + 2, preset)))
    med = lambda xs, i, k=1: statistics.median(x[i] for x in xs) * 1e3 / k  # noqa: E731
    return K, (med(r, 0), med(r, 1)), (med(o, 0, K), med(o, 1, K)), (med(p, 0, K), med(p, 1, K))


def ours_seconds(Ws, hs, cfg):
    """(wall s, CPU s, results) of one solve_layers call."""
    probs = [Problem(f"l{i}", W, LayerStats(h, 1)) for i, (W, h) in enumerate(zip(Ws, hs))]
    t0, c0 = time.perf_counter(), time.process_time()
    res = armor.solve_layers(probs, cfg)
    return time.perf_counter() - t0, time.process_time() - c0, res


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="few iterations, 4 layers per shape, random weights")
    ap.add_argument("--iters", type=int, default=None, help="timed iterations per measurement")
    ap.add_argument("--real", action="store_true", help="SmolLM2-135M weights from the GGUF (slow load)")
    ap.add_argument("--whole-model", action="store_true", help="also solve all 210 linears at the CPU default")
    ap.add_argument("--check-iters", type=int, default=None, help="steps for the equal-loss check")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--out", default=None, help="write the JSON result here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    iters = args.iters or (3 if args.smoke else 20)
    check_iters = args.check_iters or (5 if args.smoke else 50)
    preset = SolverConfig(**PRESETS["cpu"])
    cpu = SolverConfig(**{**PRESETS["cpu"], "sparse_rounds": 1})  # the reference's step: one round
    gen = torch.Generator().manual_seed(0)
    weights = real_weights() if args.real else None
    load_start = os.getloadavg()[0]
    rows, total_ms, total_cpu_ms = [], 0.0, 0.0
    for key, (d_out, d_in, n_model) in SHAPES.items():
        K = 4 if args.smoke else n_model
        Ws = weights[key][:K] if weights else [torch.randn(d_out, d_in, generator=gen) * 0.05 for _ in range(K)]
        hs = [synthetic_h(d_in, gen) for _ in range(K)]
        Kb, (ref_ms, ref_cpu), (ours_ms, ours_cpu), (preset_ms, preset_cpu) = time_interleaved(Ws, hs, cpu, iters,
                                                                                              preset)
        # Equal-loss check: same layer, same seed, check_iters steps, reference vs ours.
        ccfg = SolverConfig(**{**cpu.to_dict(), "iterations": check_iters, "patience": 10**6})
        ref = Reference(armor.prepare("ref", Ws[0], hs[0], ccfg.block_size), ccfg)
        for _ in range(check_iters):
            ref_loss = ref.step()
        res = ours_seconds(Ws[:1], hs[:1], ccfg)[2]
        rep = res[0].report
        rows.append(dict(shape=key, d_out=d_out, d_in=d_in, batch=Kb, ref_ms=ref_ms, ours_ms=ours_ms,
                         speedup=ref_ms / ours_ms, ref_cpu_ms=ref_cpu, ours_cpu_ms=ours_cpu,
                         cpu_speedup=ref_cpu / ours_cpu, preset_ms=preset_ms, preset_cpu_ms=preset_cpu,
                         loss_start=rep.loss_start, ref_loss=ref_loss,
                         ours_loss=rep.loss_final, rel_diff=abs(rep.loss_final - ref_loss) / ref_loss))
        total_ms += preset_ms * n_model
        total_cpu_ms += preset_cpu * n_model
    whole = dict(iterations=preset.iterations, block_size=preset.block_size, sparse_rounds=preset.sparse_rounds,
                 projected_s=total_ms / 1e3 * preset.iterations,
                 projected_cpu_s=total_cpu_ms / 1e3 * preset.iterations)
    if args.whole_model and weights:
        t0 = time.perf_counter()
        probs = [Problem(f"{k}{i}", W, LayerStats(synthetic_h(W.shape[1], gen), 1))
                 for k in SHAPES for i, W in enumerate(weights[k])]
        res = armor.solve_layers(probs, preset)
        whole.update(actual_s=time.perf_counter() - t0, layers=len(res),
                     mean_loss_start=sum(r.report.loss_start for r in res) / len(res),
                     mean_loss_final=sum(r.report.loss_final for r in res) / len(res),
                     fallbacks=sum(r.report.status != "ok" for r in res))
    print(f"{'shape':8} {'d_out x d_in':>12} {'batch':>5} {'ref ms/it':>10} {'ours ms/it':>10} {'speedup':>8} "
          f"{'cpu ref':>8} {'cpu ours':>8} {'cpu x':>6} {'L ref':>10} {'L ours':>10} {'rel diff':>9}")
    for r in rows:
        print(f"{r['shape']:8} {r['d_out']:>5} x {r['d_in']:<5} {r['batch']:>5} {r['ref_ms']:>10.2f} "
              f"{r['ours_ms']:>10.2f} {r['speedup']:>7.2f}x {r['ref_cpu_ms']:>8.2f} {r['ours_cpu_ms']:>8.2f} "
              f"{r['cpu_speedup']:>5.2f}x {r['ref_loss']:>10.6f} {r['ours_loss']:>10.6f} "
              f"{r['rel_diff']:>9.2e}")
    for r in rows:
        print(f"{r['shape']:8} at the preset ({preset.sparse_rounds} rounds): {r['preset_ms']:.2f} ms/it wall, "
              f"{r['preset_cpu_ms']:.2f} ms/it CPU")
    print(f"whole model (210 linears, b={preset.block_size}, {preset.iterations} it, {preset.sparse_rounds} rounds): "
          f"projected "
          f"{whole['projected_s'] / 60:.1f} min wall, {whole['projected_cpu_s'] / 60:.1f} min CPU" + (f", actual {whole['actual_s'] / 60:.1f} min" if "actual_s" in whole else ""))
    result = dict(benchmark="solver_speed", date=time.strftime("%Y-%m-%d"), machine=platform.machine(),
                  threads=torch.get_num_threads(), torch=torch.__version__, smoke=args.smoke, real=bool(weights),
                  timed_iters=iters, check_iters=check_iters,
                  load_avg_1min=[load_start, os.getloadavg()[0]], cpus=os.cpu_count(), shapes=rows, whole_model=whole)
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
