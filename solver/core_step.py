"""ARMOR's sparse-core step (armor-algorithm.md sections 4.3 and 5a), batched over layers and block pairs.

One round picks one group (row i, aligned 4 input columns g) in every block pair (p, q) and re-solves
it exactly over the 6 possible 2:4 patterns. With a = A_p[:, i_loc], B_g the 4 rows of B_q of the
group, D = diag(h_q), Q = B_g D B_g^T [4, 4] and u = G_g R^T a, the tile loss (up to a constant) is
    phi(s) = 2 s.u + |a|^2 s^T Q s.
Because Gamma = dL/dS = (2/Z) A^T (E (.) h) B^T, u needs no b x b work per tile:
    u = (Z/2) Gamma[i, g] - |a|^2 Q s_old.
Per pattern P: s_P = -(Q_P + lam I)^-1 u_P / |a|^2 with lam = DAMP_REL * trace(Q_P), solved by an
explicit 2x2 inverse with a determinant check. The best pattern replaces the group only if its
(undamped) phi is strictly below phi(s_old); a tile whose solves all fail keeps its group and counts
as a failed solve. After the round the cached products (T, G, dT, Gamma) are updated by one rank-one
term per tile, so the next iteration needs no new forward pass.
"""
from __future__ import annotations

import torch

from solver.bcd_state import BCDState
from solver.config import SELECTIONS

PATTERNS = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]])
DAMP_REL = 1e-7  # damping of each 2x2 system, relative to its trace (fp64 solves)
DET_REL = 1e-14  # a damped 2x2 system is singular when det <= DET_REL * trace^2


def _pattern_tables(device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Constant fp64 selectors: Q.view(-1, 16) @ SEL_Q gives (q00 | q01 | q11) of the 6 patterns [.., 18],
    u @ SEL_U gives (u_P0 | u_P1) [.., 12]; FIRST / SECOND [6, 4] are one-hot rows of the kept positions.
    Matmuls with one-hot tables: many times faster on CPU than advanced indexing of [..., 4, 4]."""
    i, j = PATTERNS[:, 0], PATTERNS[:, 1]
    e16, e4 = torch.eye(16, dtype=torch.float64), torch.eye(4, dtype=torch.float64)
    sel_q = torch.cat([e16[:, i * 4 + i], e16[:, i * 4 + j], e16[:, j * 4 + j]], dim=1)
    sel_u = torch.cat([e4[:, i], e4[:, j]], dim=1)
    return sel_q.to(device), sel_u.to(device), e4[i].to(device), e4[j].to(device)


def solve_patterns(Q: torch.Tensor, u: torch.Tensor, a2: torch.Tensor, s_old: torch.Tensor):
    """Exact 2:4 re-solve of groups, any leading shape [...].

    Q [..., 4, 4], u [..., 4], a2 [...] (= |a|^2), s_old [..., 4] (current values, 2:4).
    Returns (s_new [..., 4] (zeros outside the chosen pattern), pattern [...] (index into PATTERNS),
    accept [...] bool, failed [...] bool, dphi [...] (phi_new - phi_old, 0 where not accepted)).
    Computed in fp64.
    """
    lead = u.shape[:-1]
    Q, u, a2, s_old = (x.double().reshape(-1, *x.shape[len(lead):]) for x in (Q, u, a2[..., None], s_old))
    sel_q, sel_u, first, second = _pattern_tables(Q.device)
    q00, q01, q11 = (Q.reshape(-1, 16) @ sel_q).view(-1, 3, 6).unbind(1)  # [N, 6] each
    u0, u1 = (u @ sel_u).view(-1, 2, 6).unbind(1)
    tr = q00 + q11
    lam = DAMP_REL * tr
    da, dd = q00 + lam, q11 + lam
    det = da * dd - q01 * q01
    valid = torch.isfinite(det) & (tr > 0) & (det > DET_REL * tr * tr) & (a2 > 0) & torch.isfinite(a2)
    inv = -1.0 / (torch.where(valid, det, torch.ones_like(det)) * torch.where(a2 > 0, a2, torch.ones_like(a2)))
    s0 = (dd * u0 - q01 * u1) * inv
    s1 = (da * u1 - q01 * u0) * inv
    quad = s0 * (q00 * s0 + q01 * s1) + s1 * (q01 * s0 + q11 * s1)
    phi = 2 * (s0 * u0 + s1 * u1) + a2 * quad
    valid = valid & torch.isfinite(phi)
    phi = torch.where(valid, phi, torch.full_like(phi, float("inf")))
    phi_best, best = torch.min(phi, dim=-1)  # first minimum: deterministic
    Qs = torch.bmm(Q, s_old[:, :, None])[:, :, 0]
    phi_old = 2 * (s_old * u).sum(-1) + a2[:, 0] * (s_old * Qs).sum(-1)
    failed = ~valid.any(-1) | ~torch.isfinite(phi_old)
    accept = ~failed & (phi_best < phi_old)
    pick = lambda x: x.gather(-1, best[:, None])  # noqa: E731
    s_new = pick(s0) * first.index_select(0, best) + pick(s1) * second.index_select(0, best)
    s_new = torch.where(accept[:, None], s_new, s_old)
    dphi = torch.where(accept, phi_best - phi_old, torch.zeros_like(phi_old))
    return s_new.view(*lead, 4), best.view(lead), accept.view(lead), failed.view(lead), dphi.view(lead)


def group_scores(Gamma: torch.Tensor, b: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """[K, n0, n1, b*b/4]: L1 norm of Gamma (column layout [K, n1, d_out, b]) over each group.

    Candidates of a block pair are last: candidate c of pair (p, q) is local row c // (b/4), local
    group c % (b/4). ``scratch`` (Gamma's shape) takes |Gamma|: a fresh full-size temporary costs
    4x the abs itself on CPU (page faults)."""
    K, n1, d_out, _ = Gamma.shape
    n0, g = d_out // b, b // 4
    # Three adds of strided columns: on CPU sum(-1) over a size-4 axis is 2.4x slower, a matvec with
    # ones(4) 1.4x, vector_norm(ord=1) 100x.
    x = torch.abs(Gamma, out=scratch).view(-1, 4) if scratch is not None else Gamma.abs().view(-1, 4)
    sc = (x[:, 0] + x[:, 1]).add_(x[:, 2]).add_(x[:, 3]).view(K, n1, n0, b * g)
    return sc.transpose(1, 2).contiguous()


def selection_table(scores: torch.Tensor, selection: str) -> dict:
    """What ``select`` needs of the scores, once per iteration (the rounds of an iteration share them)."""
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}")
    table = {"C": scores.shape[-1], "K": scores.shape[0]}
    if selection == "uniform":
        return table
    total = scores.sum(-1)
    table["degenerate"] = ~(torch.isfinite(total) & (total > 0))
    if selection == "gradient-greedy":  # a copy: every pick is struck from it (select), so rounds never repeat
        table["greedy"] = torch.nan_to_num(scores, nan=0.0)
    else:
        table["cs"] = torch.cumsum(scores, dim=-1)
    return table


def select(scores: torch.Tensor | None, rand: torch.Tensor, selection: str, table: dict | None = None):
    """One candidate per block pair. rand [K, n0, n1] uniform in [0, 1) (one per pair, per-layer generator).

    ``table`` (from ``selection_table``) replaces ``scores`` when several rounds share one set of scores;
    gradient-greedy then takes the highest-scoring group not yet taken with this table (each pick is struck
    from the table), so the rounds of one iteration re-solve R different groups of each block pair.
    Returns (candidate [K, n0, n1] long, number of pairs that fell back to uniform [K])."""
    table = selection_table(scores, selection) if table is None else table
    C = table["C"]
    uniform = (rand * C).long().clamp_(max=C - 1)
    if selection == "uniform":
        return uniform, torch.zeros(table["K"], dtype=torch.long, device=rand.device)
    if selection == "gradient-greedy":
        pick = torch.argmax(table["greedy"], dim=-1)
        table["greedy"].scatter_(-1, pick[..., None], -1.0)  # scores are >= 0: a taken group ranks last
    else:
        cs = table["cs"]
        target = (rand * cs[..., -1])[..., None]
        pick = torch.searchsorted(cs, target.contiguous(), right=True)[..., 0].clamp_(max=C - 1)
    degenerate = table["degenerate"]
    pick = torch.where(degenerate, uniform, pick)
    return pick, degenerate.flatten(1).sum(1)


def sparse_core_round(st: BCDState, cand: torch.Tensor, b: int) -> dict:
    """One exact round on the groups ``cand`` [K, n0, n1] (candidate index per block pair), caches refreshed.

    Reads and writes A, B, V, M, S, T, G, dT, Gamma, hz, Z of ``st`` (solver.bcd_state). The residual
    E is not refreshed (the next forward recomputes it). Returns failed_solves, mask_changes and
    dloss (exact change of L, fp64, <= 0), each [K]."""
    At = st.A.transpose(-1, -2).contiguous()
    counts, term = _round(st, cand, b, [], group_grams(st.B, st.h, b), At)
    _refresh(st, [term], b)
    return counts


def sparse_core_rounds(st: BCDState, draw, b: int, rounds: int, selection: str) -> dict:
    """``rounds`` exact rounds on the batched state ``st`` in place; per-layer counts summed over rounds.

    ``draw()`` returns one uniform [K, n0, n1] tensor per round (per-layer generators). Every round
    samples its groups from the selection scores at the first round (A and B do not move between
    rounds, only S does; gradient-greedy takes the next-best group each round, never one twice); each re-solve is exact against the current state, because the group's
    gradient entries include the rank-one terms of the earlier rounds. The caches are refreshed once
    at the end (one in-place rank-one pass per round). With rounds = 1 this is ``sparse_core_round`` on
    the sampled groups. Adds uniform_fallbacks [K] to the counts."""
    table = selection_table(group_scores(st.Gamma, b, st.scratch), selection)
    Qall = group_grams(st.B, st.h, b)  # A and B do not move between rounds
    At = st.A.transpose(-1, -2).contiguous()
    terms, total = [], None
    for _ in range(rounds):
        cand, fallbacks = select(None, draw(), selection, table)
        counts, term = _round(st, cand, b, terms, Qall, At)
        counts["uniform_fallbacks"] = fallbacks
        terms.append(term)
        total = counts if total is None else {k: total[k] + v for k, v in counts.items()}
    _refresh(st, terms, b)
    return total


def pattern_masks(device, dtype) -> torch.Tensor:
    """[6, 4] 0/1 masks of the patterns in PATTERNS."""
    m = torch.zeros(len(PATTERNS), 4, dtype=dtype, device=device)
    return m.scatter_(-1, PATTERNS.to(device), 1.0)


def group_grams(B: torch.Tensor, h: torch.Tensor, b: int) -> torch.Tensor:
    """[K, n1 * b/4, 4, 4]: Q = B_g D B_g^T for every group g of input columns (4 rows of a B block)."""
    K, n1 = B.shape[:2]
    Bg = B.reshape(K, n1 * b // 4, 4, b)
    return torch.matmul(Bg * h.view(K, n1, 1, 1, b).expand(K, n1, b // 4, 1, b).reshape(K, -1, 1, b),
                        Bg.transpose(-1, -2))


def _round(st: BCDState, cand: torch.Tensor, b: int, earlier: list, Qall: torch.Tensor, At: torch.Tensor):
    """Re-solve the groups ``cand`` exactly; write S, M, V and the rows of T; return (counts, term).

    ``earlier`` holds the terms of this iteration's previous rounds, not yet in the caches; Qall the group
    Grams (``group_grams``), At = A^T per block (A does not move between rounds). Groups
    are addressed by flat row indices (index_select/index_copy_ on [-1, 4] views): several times
    cheaper on CPU than multi-dimensional advanced indexing."""
    A, B, S, Z = st.A, st.B, st.S, st.Z
    K, n1, d_out, _ = S.shape
    n0, g4 = d_out // b, b // 4
    dev = S.device
    ii, gg = cand // g4, cand % g4  # [K, n0, n1]: local row and local group of each pair's pick
    kk = torch.arange(K, device=dev)[:, None, None]
    pp = torch.arange(n0, device=dev)[None, :, None]
    qq = torch.arange(n1, device=dev)[None, None, :]
    row = kk * d_out + pp * b + ii  # global row (over the batch) of each pick
    # group index in X.view(-1, 4) for X in the column layout [K, n1, d_out, b]
    gidx = (((kk * n1 + qq) * d_out + pp * b + ii) * g4 + gg).reshape(-1)
    shape4 = (K, n0, n1, 4)
    take = lambda X: X.view(-1, 4).index_select(0, gidx).view(shape4)  # noqa: E731
    put = lambda X, v: X.view(-1, 4).index_copy_(0, gidx, v.reshape(-1, 4))  # noqa: E731
    s_old, gam = take(S), take(st.Gamma)
    if earlier:  # Gamma change of an earlier round: (A_p^T a_r)[i] (w_r B_q^T)[group], by flat indices
        pair = torch.arange(K * n0 * n1, device=dev)
        ia, iw = pair * b + ii.reshape(-1), pair * g4 + gg.reshape(-1)
        for _a, _w, Ata_r, wB_r in earlier:
            gam = gam + (Ata_r.view(-1).index_select(0, ia)[:, None]
                         * wB_r.view(-1, 4).index_select(0, iw)).view(shape4)
    # column i_loc of A_p: row i_loc of A_p^T
    a = At.view(-1, b).index_select(0, ((kk * n0 + pp) * b + ii).reshape(-1)).view(K, n0, n1, b)
    bidx = ((kk * n1 + qq) * g4 + gg).reshape(-1)  # (layer, input block, group): row of B.view(-1, 4 b)
    Bg = B.reshape(-1, 4 * b).index_select(0, bidx).view(K, n0, n1, 4, b)  # rows of B_q in the group
    Q = Qall.reshape(-1, 16).index_select(0, bidx).view(K, n0, n1, 4, 4)
    a2 = torch.linalg.vecdot(a, a)
    Qs = torch.bmm(Q.view(-1, 4, 4), s_old.reshape(-1, 4, 1)).view(shape4)
    u = (0.5 * Z)[:, None, None, None] * gam - a2[..., None] * Qs
    s_new, pat, accept, failed, dphi = solve_patterns(Q, u, a2, s_old)
    s_new = s_new.to(S.dtype)
    m_new = pattern_masks(dev, S.dtype).index_select(0, pat.reshape(-1)).view(shape4)
    m_old = take(st.M)  # the mask is a 0/1 tensor of S's dtype (no bool conversion in S = V M)
    changed = accept & (m_new != m_old).any(-1)
    m_new = torch.where(accept[..., None], m_new, m_old)
    put(st.M, m_new)
    put(st.V, s_new)  # V outside M never reaches S, and the group's kept entries are s_new
    put(S, s_new)
    ds = s_new - s_old  # zero where not accepted
    dTrow = (ds[..., :, None] * Bg).sum(-2)  # [K, n0, n1, b]: change of row i of T in column block q
    tidx = (row * n1 + qq).reshape(-1)  # row i of T within column block q: one per pair, never repeated
    Tb = st.T.view(-1, b)
    Tb.index_copy_(0, tidx, Tb.index_select(0, tidx).add_(dTrow.reshape(-1, b)))
    w = dTrow * st.hz.view(K, 1, n1, b)  # change of row i of the residual tile, times (2/Z) h
    Ata = torch.matmul(a, A)  # A_p^T a, as the row vector a^T A_p (one bmm over (layer, output block))
    wB = torch.einsum("kpqj,kqmj->kpqm", w, B).contiguous()  # w B_q^T
    counts = {"failed_solves": failed.flatten(1).sum(1), "mask_changes": changed.flatten(1).sum(1),
              "dloss": dphi.flatten(1).sum(1) / Z.double()}
    return counts, (a, w, Ata, wB)


def _refresh(st: BCDState, terms: list, b: int) -> None:
    """Add the rounds' tile terms to the cached G, dT and Gamma (a few d_out*d_in FLOP each)."""
    K, n1, d_out, _ = st.S.shape
    n0 = d_out // b
    tiles = lambda X: X.view(K, n0, b, n1, b).permute(0, 1, 3, 2, 4)  # noqa: E731  [K, n0, n1, b, b] of rows
    ctiles = lambda X: X.view(K, n1, n0, b, b).transpose(1, 2)  # noqa: E731  the same of the column layout
    # One in-place addcmul per term: a batched rank-R product of the b x b tiles plus one add is
    # 1.6x slower on CPU even at R = 4 (tiny per-tile matmuls, and a full temporary).
    for a, w, Ata, wB in terms:
        tiles(st.G).addcmul_(a[..., :, None], w[..., None, :])  # G = (2/Z) E (.) h
        tiles(st.dT).addcmul_(Ata[..., :, None], w[..., None, :])
        ctiles(st.Gamma).addcmul_(Ata[..., :, None], wB[..., None, :])
