"""The ARMOR solver: NoWag-P start, then block coordinate descent (armor-algorithm.md sections 3-5).

``solve_layers(problems, cfg)`` groups the problems by shape and solves each group in batches (at most
``cfg.max_batch`` layers and BATCH_ELEMS elements, of even size): every iteration is one Adam step on (A, B, V)
with analytic gradients, then ``cfg.sparse_rounds`` exact sparse-core rounds (solver.core_step). Differences from
the official code, all deliberate (section 5 and 11 of the spec):
- the selection gradient is taken with respect to S only and, like the loss, comes from cached
  products that the sparse-core round refreshes by rank-one terms: 6 block-diagonal products per
  iteration instead of 16, same trajectory up to fp32 rounding;
- the sparse-core round accepts a group only if its tile loss falls; the best iterate is returned,
  and a final fp64 check guarantees loss_final <= loss_start (the NoWag-P proxy loss);
- every layer has its own torch.Generator seeded with cfg.seed, so a layer's result does not depend
  on which other layers share its batch;
- non-finite values during the solve give status "fallback" with the NoWag-P start returned.
With ``cfg.refit == "output"`` (an option of ours, solver/refit.py) the BCD's result, or the NoWag-P start when
that has the lower output error, is then refitted to the layer's output error under the full input Hessian with
its mask fixed; the report's losses are then that output loss (1 = all-zero weight) and the BCD's go to notes.
"""
from __future__ import annotations

import math
import time

import torch
from torch.optim.adam import adam

from solver import bcd_objective as obj
from solver import block_hessian as bh
from solver.baselines import nowag_score
from solver.blockdiag import check_block_size, identity_blocks, product
from solver.config import SolverConfig
from solver.core_step import sparse_core_rounds
from solver.factors import Factorization, LayerResult, SolveReport
from solver.normalizer import fold, normalize
from solver.refit import output_loss, refit, shrunk
from solver.sparsity import check_24_shape, mask_24, positive_zeros
from solver.stats import repair_h

BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
# Largest batched [K, d_out, d_in] tensor, in elements (48 MB fp32). Every full-size tensor of a batch is
# allocated once (outputs are written in place, |Gamma| goes to a kept scratch buffer); the temporaries of
# an iteration are at most a quarter of this, below glibc's 32 MB mmap ceiling, past which every temporary
# is a fresh mmap whose page faults cost more than the arithmetic (measured 4x). Twice the 24 MB of the
# first version: the sparse-core rounds cost little more per batch for twice the layers (8-10 % per layer
# on SmolLM2's shapes, benchmarks/RESULTS_solver.md).
BATCH_ELEMS = 12 * 2**20
# The best iterate is copied at most this often (a copy of S is a full pass over the layer); the
# last iterate is always a candidate, so the returned loss is min over checkpoints and the end.
CHECKPOINT_EVERY = 10


def prepare(name: str, W: torch.Tensor, h: torch.Tensor, b: int, H_blocks: torch.Tensor | None = None,
            hessian_damp: float = 0.01, objective: str = "block-hessian") -> dict:
    """Validate one layer and build its NoWag-P start (unbatched, fp32, on W's device).

    With H's diagonal blocks [d_in/b, b, b] (a block-Hessian ``objective``) the solver's target and wrappers
    are W' = diag(rho) W_bar C, A' = diag(rho), B' = C (solver.block_hessian) and its h is all ones; the mask
    is NoWag-P's from h either way."""
    if W.dim() != 2:
        raise ValueError(f"{name}: weight must be 2-D, got shape {tuple(W.shape)}")
    W = W.float()
    if not bool(torch.isfinite(W).all()):
        bad = int((~torch.isfinite(W)).sum())
        raise ValueError(f"{name}: weight contains {bad} NaN/Inf entries; cannot solve this layer")
    d_out, d_in = W.shape
    check_24_shape(d_in, name)
    check_block_size(d_out, d_in, b, name)
    if h.shape != (d_in,):
        raise ValueError(f"{name}: h has shape {tuple(h.shape)}, expected ({d_in},)")
    h, n_rep = repair_h(h.float().to(W.device), name)
    h = h / h.mean()  # the loss is scale-free in h; this keeps Z far from fp32 overflow
    W_bar, r, c = normalize(W)
    M = mask_24(nowag_score(W, h))
    S = torch.where(M, W_bar, torch.zeros((), device=W.device))
    A0, B0 = identity_blocks(d_out // b, b, device=W.device), identity_blocks(d_in // b, b, device=W.device)
    start = {"W_bar": W_bar, "h": h, "r": r, "c": c, "M": M, "S": S, "A": A0, "B": B0, "h_replaced": n_rep,
             "C": None, "rho": None, "spec_W_bar": W_bar, "spec_h": h}
    if H_blocks is not None:
        rho, C = bh.metric(W_bar, r, c, H_blocks.float().to(W.device), b, hessian_damp, objective, name)
        Wm = bh.to_metric(W_bar if rho is None else W_bar * rho[:, None], C)
        start.update(W_bar=Wm, A=bh.rows_in(A0, rho), B=C.clone(), h=torch.ones_like(h), C=C, rho=rho)
    return start


def _init_batch(starts: list[dict], cfg: SolverConfig, dev: torch.device) -> dict:
    b = cfg.block_size
    st = {k: torch.stack([s[k] for s in starts]).to(dev) for k in ("W_bar", "h", "S", "A", "B")}
    st["S"] = obj.to_cols(st["S"], b)  # S, V, M, Gamma and V's moments in the column layout (bcd_objective)
    # The mask is 0/1 in S's dtype: S = V M and dL/dV = Gamma M need no bool conversion.
    st["M"] = obj.to_cols(torch.stack([s["M"] for s in starts]).to(dev, st["S"].dtype), b)
    st["V"] = st["S"].clone()
    st["Z"] = obj.loss_scale(st["W_bar"], st["h"])
    st["hz"] = st["h"] * (2.0 / st["Z"])[:, None]
    st["T"], st["E"] = obj.forward(st["A"], st["S"], st["B"], st["W_bar"])
    st["G"] = obj.weighted_residual(st["E"], st["hz"])
    st["dT"], st["Gamma"] = obj.core_gradient(st["A"], st["B"], st["G"])
    st["L"] = obj.loss_from(st["E"], st["G"])
    if starts[0]["C"] is not None:  # a block-Hessian metric: Adam moves A, B themselves (A' = diag(rho) A, B' = B C)
        st["C"] = torch.stack([s["C"] for s in starts]).to(dev)
        st["Bx"] = identity_blocks(st["B"].shape[0] * st["B"].shape[1], b, device=dev).view_as(st["B"]).clone()
        if starts[0]["rho"] is not None:
            st["rho"] = torch.stack([s["rho"] for s in starts]).to(dev)
            st["Ax"] = identity_blocks(st["A"].shape[0] * st["A"].shape[1], b, device=dev).view_as(st["A"]).clone()
    if cfg.continuous == "adam":
        for p in _params(st):
            st["m_" + p], st["v_" + p] = torch.zeros_like(st[p]), torch.zeros_like(st[p])
    return st


def _params(st: dict) -> tuple[str, str, str]:
    """Names of the tensors Adam moves: A, B, V; with a metric, A and B in their own coordinates (Ax, Bx)."""
    return ("Ax" if "Ax" in st else "A", "Bx" if "Bx" in st else "B", "V")


def adam_update(param: torch.Tensor, grad: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float):
    """In-place Adam step written like torch.optim.Adam's single-tensor path (no weight decay)."""
    b1, b2 = BETAS
    m.lerp_(grad, 1 - b1)
    v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
    bc1, bc2 = 1 - b1**step, 1 - b2**step
    denom = (v.sqrt() / bc2**0.5).add_(ADAM_EPS)
    param.addcdiv_(m, denom, value=-lr / bc1)


def _adam_all(st: dict, grads: list, step: int, lr: float) -> None:
    """Adam on A, B, V: torch's fused kernel (one pass per tensor), else the plain update above."""
    names = _params(st)
    params = [st[p] for p in names]
    ms, vs = [st["m_" + p] for p in names], [st["v_" + p] for p in names]
    steps = [torch.tensor(float(step - 1), device=params[0].device) for _ in names]
    try:
        adam(params, grads, ms, vs, [], steps, foreach=False, fused=True, amsgrad=False, beta1=BETAS[0],
             beta2=BETAS[1], lr=lr, weight_decay=0.0, eps=ADAM_EPS, maximize=False)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        for p, g, m, v in zip(params, grads, ms, vs):
            adam_update(p, g, m, v, step, lr)


def continuous_step(st: dict, step: int, lr: float, b: int) -> None:
    """One joint Adam step on A, B, V from the cached products, then refresh them (2 + 4 units)."""
    gA, gB = obj.wrapper_gradients(st["G"], st["T"], st["S"], st["dT"], b)
    gV = st["Gamma"].mul_(st["M"])  # Gamma is recomputed below, so its buffer can hold dL/dV
    if "C" in st:  # chain rule through B' = B C and A' = diag(rho) A (solver.block_hessian)
        gB = torch.matmul(gB, st["C"].transpose(-1, -2))
        rho = st["rho"].view(*st["A"].shape[:3], 1) if "rho" in st else None
        if rho is not None:
            gA = gA.mul_(rho)
    _adam_all(st, [gA, gB, gV], step, lr)
    if "C" in st:
        torch.matmul(st["Bx"], st["C"], out=st["B"])
        if rho is not None:
            torch.mul(st["Ax"], rho, out=st["A"])
    torch.mul(st["V"], st["M"], out=st["S"])
    obj.forward(st["A"], st["S"], st["B"], st["W_bar"], st["T"], st["E"])
    obj.weighted_residual(st["E"], st["hz"], st["G"])
    st["L"] = obj.loss_from(st["E"], st["G"])
    obj.core_gradient(st["A"], st["B"], st["G"], st["dT"], st["Gamma"])


def learning_rate(cfg: SolverConfig, t: int) -> float:
    """Adam step size of iteration t (1-based): constant, or cosine decay from cfg.lr to 0 at the last one."""
    if cfg.lr_schedule == "cosine" and cfg.iterations > 1:
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (t - 1) / (cfg.iterations - 1)))
    return cfg.lr


def bcd_iteration(st: dict, gens: list, t: int, cfg: SolverConfig):
    """Iteration t on the batched state: Adam step, cfg.sparse_rounds exact sparse-core rounds.

    Returns (loss [K] fp64, per-layer counts of sparse_core_rounds)."""
    b = cfg.block_size
    K, n1, d_out, _ = st["S"].shape  # column layout
    if cfg.continuous == "adam":
        continuous_step(st, t, learning_rate(cfg, t), b)
    dev = st["S"].device
    draw = lambda: torch.stack([torch.rand(d_out // b, n1, generator=g, device=dev) for g in gens])  # noqa: E731
    counts = sparse_core_rounds(st, draw, b, cfg.sparse_rounds, cfg.selection, cfg.reset_adam_on_mask_change)
    st["L"] = st["L"] + counts["dloss"]  # exact: each round changes each tile's quadratic by dphi
    return st["L"], counts


def _unbatch(best: dict, j: int):
    """(A, B, S) of the j-th layer of a batched snapshot, on the CPU, S back in the row layout."""
    return best["A"][j].cpu(), best["B"][j].cpu(), obj.to_rows(best["S"][j:j + 1])[0].cpu()


def _select_rows(st: dict, keep: torch.Tensor) -> dict:
    return {k: v[keep] for k, v in st.items()}


def _solve_chunk(names, starts, cfg: SolverConfig, dev: torch.device) -> list[dict]:
    """Run BCD on same-shaped layers together; return per-layer raw outcomes (CPU tensors)."""
    K = len(starts)
    st = _init_batch(starts, cfg, dev)
    gens = [torch.Generator(device=dev).manual_seed(cfg.seed) for _ in range(K)]
    L = st["L"]
    out = [dict(failed_solves=0, mask_changes=0, uniform_fallbacks=0, iterations=0, early_stopped=False,
                best_iteration=0, nonfinite=not bool(torch.isfinite(L[k]))) for k in range(K)]
    # A, B of the snapshot are Adam's own (with a metric: Ax or A, and Bx; never A' = diag(rho) A, B' = B C)
    src = dict(zip(("A", "B"), _params(st)[:2]), S="S")
    best = {k: st[src[k]].clone() for k in ("A", "B", "S")}
    best_L, prev_L = L.clone(), L.clone()
    patience = torch.full((K,), cfg.patience, dtype=torch.long, device=dev)
    rows = list(range(K))  # rows[j]: original index of the j-th active layer
    active = torch.tensor([not o["nonfinite"] for o in out], device=dev)
    for t in range(1, cfg.iterations + 1):
        if not bool(active.all()):
            keep = active.nonzero()[:, 0]
            rows = [rows[j] for j in keep.tolist()]
            st, best = _select_rows(st, keep), _select_rows(best, keep)
            best_L, prev_L, patience = best_L[keep], prev_L[keep], patience[keep]
            gens = [gens[j] for j in keep.tolist()]
        if not rows:
            break
        L, counts = bcd_iteration(st, gens, t, cfg)
        finite = torch.isfinite(L)
        no_gain = (L > (1 - cfg.rtol) * prev_L) | (L > prev_L - cfg.atol) | ~finite
        patience = torch.where(no_gain, patience - 1, torch.full_like(patience, cfg.patience))
        prev_L = L
        stopped = (patience <= 0) | ~finite
        # Snapshot the best iterate every CHECKPOINT_EVERY iterations and whenever a layer stops.
        due = stopped | (t % CHECKPOINT_EVERY == 0) | (t == cfg.iterations)
        improved = finite & (L < best_L) & due
        if bool(improved.any()):
            idx = improved.nonzero()[:, 0]
            for k in best:
                best[k][idx] = st[src[k]][idx]
            best_L = torch.where(improved, L, best_L)
        c = {k: v.tolist() for k, v in counts.items() if k != "dloss"}
        imp, stp, fin = improved.tolist(), stopped.tolist(), finite.tolist()
        for j, k in enumerate(rows):
            o = out[k]
            o["failed_solves"] += c["failed_solves"][j]
            o["mask_changes"] += c["mask_changes"][j]
            o["uniform_fallbacks"] += c["uniform_fallbacks"][j]
            o["iterations"] = t
            o["best_iteration"] = t if imp[j] else o["best_iteration"]
            o["nonfinite"] = not fin[j]
            o["early_stopped"] = fin[j] and stp[j] and t < cfg.iterations
            if stp[j]:
                o["A"], o["B"], o["S"] = _unbatch(best, j)
        active = ~stopped
    for j, k in enumerate(rows):
        if "S" not in out[k]:
            out[k]["A"], out[k]["B"], out[k]["S"] = _unbatch(best, j)
    for k, o in enumerate(out):  # layers that were never active (non-finite start): A = B = I
        if "S" not in o:
            o["A"], o["B"] = (identity_blocks(*starts[k][x].shape[:2]) for x in ("A", "B"))
            o["S"] = starts[k]["S"].cpu()
    return out


def _finish(name: str, start: dict, raw: dict, seconds: float, cfg: SolverConfig) -> LayerResult:
    """Choose between the best iterate and the start, fold the normaliser, build the report."""
    W_bar, h = start["W_bar"].cpu(), start["h"].cpu()
    C, rho = (None if start[k] is None else start[k].cpu() for k in ("C", "rho"))
    S0 = start["S"].cpu()
    A0, B0 = (identity_blocks(*start[k].shape[:2]) for k in ("A", "B"))  # the start: A = B = I
    A, S, B = raw["A"], raw["S"], raw["B"]

    def loss(Ax, Sx, Bx):  # the solved objective of stored factors, fp64 (with a metric: A' = diag(rho) A, B' = B C)
        if C is None:
            return obj.exact_loss(W_bar, Ax, Sx, Bx, h)
        return obj.exact_loss(W_bar, bh.rows_in(Ax.double(), rho), Sx, bh.in_metric(Bx, C), h)

    loss_start = loss(A0, S0, B0)
    status, note = "ok", None
    finite = all(bool(torch.isfinite(x).all()) for x in (A, S, B))
    loss_final = loss(A, S, B) if finite else float("nan")
    if raw["nonfinite"] or not finite or not loss_final == loss_final:
        status, note = "fallback", "non-finite values during the solve; returned the NoWag-P start"
    elif loss_final > loss_start:
        note = "best iterate not better than the start in fp64; returned the NoWag-P start"
    if note is not None:
        A, S, B, loss_final = A0, S0, B0, loss_start
    if not loss_final <= loss_start:
        raise AssertionError(f"{name}: ARMOR loss {loss_final} exceeds the NoWag-P start {loss_start}")
    A_f, B_f = fold(A, B, start["r"].cpu(), start["c"].cpu())
    fact = Factorization(positive_zeros(S), A_f.contiguous(), B_f.contiguous()).validated(name)
    notes = {k: int(raw[k]) for k in ("failed_solves", "mask_changes", "uniform_fallbacks", "best_iteration")}
    notes.update(h_replaced=int(start["h_replaced"]), block_size=cfg.block_size, selection=cfg.selection,
                 continuous=cfg.continuous, device=cfg.device, objective=cfg.objective)
    if C is not None:  # the specified (diagonal) proxy of the same factors, for comparison with other methods
        spec = (start["spec_W_bar"].cpu(), start["spec_h"].cpu())
        notes.update(diag_loss_start=obj.exact_loss(spec[0], A0, S0, B0, spec[1]),
                     diag_loss_final=obj.exact_loss(spec[0], A, S, B, spec[1]))
    if note:
        notes["message"] = note
    report = SolveReport(loss_start, loss_final, int(raw["iterations"]), seconds, bool(raw["early_stopped"]),
                         status, notes)
    return LayerResult(fact, report)


def output_refit(name: str, W: torch.Tensor, H: torch.Tensor, start: dict, res: LayerResult,
                 cfg: SolverConfig) -> LayerResult:
    """cfg.refit == "output": refit the factors with the lower output loss, ARMOR's or the NoWag-P start's
    (W masked), with their mask fixed. The report's losses become output losses, so loss_final <= loss_start
    still holds (the refit never raises the loss of what it starts from); the BCD's go to notes. solve_layers
    has checked that every layer has its full H before any solve starts."""
    t0 = time.perf_counter()
    dev = torch.device(cfg.device)
    W, H_full = W.float().to(dev), H.float().to(dev)
    H = shrunk(H_full, cfg.refit_shrink, cfg.block_size if cfg.refit_shrink_to == "block" else 1)  # H at shrink 0
    f = res.factors
    W0 = torch.where(start["M"].to(dev), W, torch.zeros((), device=dev))  # the NoWag-P start, A = B = I
    loss_start = output_loss(W, W0, H)
    A, S, B = (x.to(dev) for x in (f.A_blocks, f.S, f.B_blocks))
    loss_bcd = output_loss(W, f.to_dense().to(dev), H)
    origin, loss_from = "armor", loss_bcd
    if not loss_bcd <= loss_start:
        A, B = (identity_blocks(*x.shape[:2], device=dev) for x in (A, B))
        S, origin, loss_from = W0, "nowag", loss_start
    A, S, B, info = refit(W, A, S, B, H, rounds=cfg.refit_rounds, damp=cfg.hessian_damp, name=name,
                          loss_before=loss_from)
    loss_final = info["loss_after"]
    if not loss_final <= loss_start:
        raise AssertionError(f"{name}: refitted output loss {loss_final} exceeds the NoWag-P start {loss_start}")
    seconds = time.perf_counter() - t0
    fact = Factorization(positive_zeros(S.cpu()), A.cpu().contiguous(), B.cpu().contiguous()).validated(name)
    r = res.report
    notes = {**r.notes, "bcd_loss_start": r.loss_start, "bcd_loss_final": r.loss_final, "output_loss_bcd": loss_bcd,
             "refit": cfg.refit, "refit_from": origin, "refit_accepted": info["accepted"],
             "refit_shrink": cfg.refit_shrink, "output_loss_full_h": (
                 loss_final if cfg.refit_shrink == 0 else output_loss(W, product(A, S, B), H_full)),
             "refit_seconds": round(seconds, 4)}
    report = SolveReport(loss_start, loss_final, r.iterations, r.seconds + seconds, r.early_stopped, r.status, notes)
    return LayerResult(fact, report)


def batches(items: list, most: int) -> list[list]:
    """Consecutive batches of at most ``most`` items (at least 1), as even in size as possible:
    60 layers at most 18 give 15, 15, 15, 15, not 18, 18, 18, 6 (a small last batch is the dearest per layer)."""
    n = len(items)
    count = -(-n // max(1, most)) if n else 0
    cuts = [round(i * n / count) for i in range(count + 1)] if count else [0]
    return [items[cuts[i]:cuts[i + 1]] for i in range(count)]


def solve_layers(problems, cfg: SolverConfig) -> list[LayerResult]:
    """Solve every problem (``solver.methods.Problem``); same-shaped problems share batches."""
    dev = torch.device(cfg.device)
    b = cfg.block_size
    starts = []
    for p in problems:
        if p.stats is None:
            raise ValueError(f"{p.name}: ARMOR needs calibration statistics (h)")
        if cfg.refit == "output" and p.stats.H is None:
            raise ValueError(f"{p.name}: --refit output needs the layer's full input Hessian (calibrate with "
                             f"full statistics, or run without the refit)")
        Hb = None
        if cfg.objective != "diag":
            Hb = p.stats.hessian_blocks(b)
            if Hb is None:
                raise ValueError(f"{p.name}: --objective {cfg.objective} needs the input Hessian's {b}-wide "
                                 f"diagonal blocks (calibrate with full statistics or this block size)")
        starts.append(prepare(p.name, p.W.to(dev), p.stats.h, b, Hb, cfg.hessian_damp, cfg.objective))
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        groups.setdefault(tuple(p.W.shape), []).append(i)
    results: list[LayerResult | None] = [None] * len(problems)
    for shape, idx in groups.items():
        for chunk in batches(idx, min(cfg.max_batch, BATCH_ELEMS // (shape[0] * shape[1]))):
            t0 = time.perf_counter()
            raws = _solve_chunk([problems[i].name for i in chunk], [starts[i] for i in chunk], cfg, dev)
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            share = (time.perf_counter() - t0) / len(chunk)
            for i, raw in zip(chunk, raws):
                results[i] = _finish(problems[i].name, starts[i], raw, share, cfg)
                if cfg.refit == "output":
                    p = problems[i]
                    results[i] = output_refit(p.name, p.W, p.stats.H, starts[i], results[i], cfg)
    return results
