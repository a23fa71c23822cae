"""Chains through a set of vectors by cosine similarity: the solver behind the crossfilter permutation
(docs/METHOD.md §6; nern/permutation.py turns a chain into grid positions).

A chain visits every vector once; its quality is the mean cosine of consecutive vectors (`chain_quality`).
Similarity is the cosine of the flattened vectors; a zero vector has cosine 0 with everything.

Methods (`find_chain`):
- `greedy`: the paper's algorithm, exactly: start at kernel 0, repeatedly go to the unvisited kernel of
  highest cosine similarity, ties to the lowest index. One matrix-vector product per step over the
  still-unvisited kernels (compacted as the set shrinks), O(N^2 D). A precomputed N x N similarity matrix
  does not help here: with D = 9 the product costs about as much as reading one row of that matrix, and
  the matrix needs N^2 memory.
- `fast`: a better chain in near-linear time, for the large layers where the exact greedy takes many
  minutes (an hour per 512x512 layer in the reference code). It
  1. finds 8 nearest neighbour candidates of every kernel (exact by blocked matmul up to 8192 kernels;
     above, faiss's inverted-file index: spherical k-means cells of ~256 kernels, each kernel searched in
     its 8 closest cells, which finds about 91% of the true neighbours),
  2. builds the chain by greedy edge matching: take candidate edges from the best similarity down, keep an
     edge when both ends still have fewer than two chain neighbours and it closes no cycle; the path
     fragments left over are joined the same way through the nearest neighbours of their end points,
  3. polishes it with 2-opt and Or-opt moves over the neighbour lists, accepting only strict gains.
  Edge matching avoids the long jumps the nearest-neighbour walk makes whenever it has painted itself into
  a corner, so the chain's mean cosine is higher than the exact greedy's, not merely close to it.
  All steps are deterministic (faiss's k-means draws its sample from `seed`).
- `auto`: for layers up to `AUTO_EXACT_MAX` kernels runs both and keeps the chain of higher quality (ties
  go to the paper's greedy): both take at most a couple of seconds there, and the result is then never
  worse than the paper's by construction. Larger layers use `fast` only, where the exact greedy takes
  minutes. (`fast` alone was as fast or faster and better on every layer measured, from 256 kernels up.)
- `lkh`: LKH-3 through the elkai package, 10 CPU seconds of search per layer, up to LKH_MAX kernels (it
  takes the full distance matrix). Near-optimal, so it is the ceiling bench/permute.py measures the others
  against; about a minute per 4096-kernel layer, for 0.4-0.6% more mean cosine than `fast` (below).

Measured by `bench/permute.py --before 4d5c60b --baseline-limit-seconds 120 --skip-resnet18` on the 2-core
development CPU shared with other jobs (load 5-11), one thread. One 512x512x3x3 layer of Gaussian weights
(262,144 kernels): fast 27 s, mean cosine 0.95839 (with the hand-written k-means of 4d5c60b: 32 s, 0.95838;
faster of two alternated runs); exact greedy ~170 s extrapolated (290 s, 0.9563 when run to the end on a
quieter day). ResNet20 / ResNet56 (19 / 55 convs): fast 0.8929 / 0.8971, greedy 0.8855 / 0.8896, fast better
on every layer; on one layer of each shape, LKH 0.9176 / 0.9276 against fast 0.9123 / 0.9225 and greedy
0.9053 / 0.9160. On a 64x64 Gaussian layer: LKH 0.8850, fast 0.8807, greedy 0.8726.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from nern.errors import NernError

METHODS = ("auto", "greedy", "fast", "lkh")

AUTO_EXACT_MAX = 16384  # auto: up to this many kernels, run the exact greedy as well and keep the better
EXACT_NEIGHBOURS_MAX = 8192  # fast: up to this many kernels, nearest neighbours by brute force
NEIGHBOURS = 8  # candidate neighbours per kernel (the refinement uses the best half)
CELL_SIZE = 256  # fast: mean kernels per k-means cell
PROBES = 8  # fast: cells searched per kernel
TWO_OPT_ROUNDS = 2  # fast: refinement rounds; later rounds gain little for their time
OR_OPT_ROUNDS = 1
LKH_MAX = 8192  # lkh: the full distance matrix of more kernels takes gigabytes
LKH_SCALE = 100_000  # lkh: integer distances resolve cosine to 1e-5
LKH_TIME_LIMIT_S = 10.0  # lkh: search time per layer when chosen as a method
_DEAD = -1.0e30  # similarity penalty of visited entries: below any real dot product
_GAIN_EPS = 1e-6  # a refinement move must gain at least this much similarity

# ---------------------------------------------------------------------------------------------- basics


@contextlib.contextmanager
def _single_thread() -> Iterator[None]:
    """Step loops issue thousands of tiny ops; with two threads their synchronisation dominates (10x)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

def unit_rows(vectors: Tensor) -> Tensor:
    """Rows scaled to unit length (float32), so dot products are cosines; zero rows stay zero (cosine 0)."""
    rows = vectors.detach().reshape(vectors.shape[0], -1).float().cpu()
    norms = rows.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, rows / norms.clamp_min(1e-30), torch.zeros_like(rows))

def chain_quality(vectors: Tensor, order: Tensor) -> float:
    """Mean cosine similarity of consecutive vectors along `order`, the figure every method is judged by
    (1.0 for fewer than two vectors)."""
    unit = unit_rows(vectors).double()[order.long()]
    if unit.shape[0] < 2:
        return 1.0
    return float((unit[1:] * unit[:-1]).sum(1).mean())

# --------------------------------------------------------------------------------- exact greedy chain


def greedy_order(rows: Tensor, start: int = 0, deadline: float | None = None) -> Tensor:
    """Greedy walk by raw dot product of `rows`: one matvec per step, ties to the lowest index.

    Visited entries carry a huge negative value in an extra coordinate, so masking is part of the product;
    the set is compacted (order preserved, so argmax still breaks ties by lowest index) once half is visited.
    Past `deadline` (a `time.perf_counter()` value) it stops and returns the walk so far.
    """
    n, dim = rows.shape
    order = torch.empty(n, dtype=torch.long)
    if n == 0:
        return order
    table = torch.cat([rows.float(), torch.zeros(n, 1)], dim=1).t().contiguous()  # [dim + 1, live]
    ids = torch.arange(n)
    slot, dead = int(start), 0
    with _single_thread():
        for t in range(n):
            order[t] = ids[slot]
            if t == n - 1:
                break
            if deadline is not None and t % 256 == 0 and time.perf_counter() > deadline:
                return order[: t + 1]
            query = table[:, slot].clone()
            query[dim] = 1.0
            table[dim, slot] = _DEAD
            dead += 1
            if dead * 2 > table.shape[1] >= 2048:
                live = table[dim] == 0
                table, ids, dead = table[:, live].contiguous(), ids[live], 0
            slot = int(torch.mv(table.t(), query).argmax())
    return order

def batched_greedy_orders(rows: Tensor) -> Tensor:
    """Independent greedy chains (start 0, cosine, ties to lowest index) over each batch row's [n, D] set."""
    batch, n, _ = rows.shape
    orders = torch.empty(batch, n, dtype=torch.long)
    if n == 0:
        return orders
    penalty = torch.zeros(batch, n)
    every = torch.arange(batch)
    current = torch.zeros(batch, dtype=torch.long)
    with _single_thread():
        for t in range(n):
            orders[:, t] = current
            if t == n - 1:
                break
            penalty[every, current] = _DEAD
            query = rows[every, current]
            current = (torch.bmm(rows, query.unsqueeze(2)).squeeze(2) + penalty).argmax(dim=1)
    return orders

def greedy_chain(vectors: Tensor, start: int = 0, *, time_limit_s: float | None = None) -> Tensor:
    """The paper's greedy nearest-neighbour chain by cosine similarity (ties to the lowest index).

    With `time_limit_s` (for benchmarks) the walk stops when the time is up and the chain so far is returned.
    """
    n = vectors.shape[0]
    if n and not 0 <= start < n:
        raise NernError(f"chain start {start} is outside 0..{n - 1}; pass an index of one of the vectors")
    deadline = None if time_limit_s is None else time.perf_counter() + time_limit_s
    return greedy_order(unit_rows(vectors), start, deadline)

# ----------------------------------------------------------------------------- fast: nearest neighbours


def _exact_neighbours(unit: Tensor, k: int, block: int = 2048) -> tuple[Tensor, Tensor]:
    """The k most similar other rows of every row, by blocked brute force (small sets)."""
    n = unit.shape[0]
    k = min(k, n - 1)
    idx, sim = torch.empty(n, k, dtype=torch.long), torch.empty(n, k)
    for lo in range(0, n, block):
        hi = min(n, lo + block)
        sims = unit[lo:hi] @ unit.t()
        sims[torch.arange(hi - lo), torch.arange(lo, hi)] = -torch.inf
        sim[lo:hi], idx[lo:hi] = sims.topk(k, dim=1)
    return idx, sim

def _approximate_neighbours(unit: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """About k nearest neighbours per row by faiss's inverted-file index (large sets).

    Spherical k-means cells of ~CELL_SIZE rows (fitted on a seeded subsample), each row searched in its
    PROBES closest cells: about 91% of the true 8 neighbours on Gaussian kernels, the refinement's lists need
    no more. (scipy's cKDTree gives exact lists but is 15x slower in 9-D; faiss's HNSW is 3x slower.)
    """
    import faiss

    n, dim = unit.shape
    data = unit.contiguous().numpy()
    cells = max(1, n // CELL_SIZE)
    quantizer = faiss.IndexFlatIP(dim)
    index = faiss.IndexIVFFlat(quantizer, dim, cells, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter, index.cp.seed, index.cp.spherical = 8, seed, True
    index.cp.max_points_per_centroid = 64
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(torch.get_num_threads())
    try:
        index.train(data)
        index.add(data)
        index.nprobe = min(PROBES, cells)
        sim, idx = (torch.from_numpy(a) for a in index.search(data, k + 1))
    finally:
        faiss.omp_set_num_threads(threads)
    rows = torch.arange(n).unsqueeze(1)
    missing = (idx == rows) | (idx < 0)  # the row itself, or fewer than k + 1 found in the probed cells
    sim = sim.masked_fill(missing, -torch.inf)
    best = torch.argsort(sim, dim=1, descending=True, stable=True)[:, :k]
    sim, idx = sim.gather(1, best), idx.long().gather(1, best)
    return torch.where(sim > -torch.inf, idx, rows), sim

def _neighbours(unit: Tensor, k: int, seed: int) -> tuple[Tensor, Tensor]:
    """k neighbour candidates per row, best first; missing entries point to the row itself with -inf."""
    if unit.shape[0] <= EXACT_NEIGHBOURS_MAX:
        return _exact_neighbours(unit, k)
    return _approximate_neighbours(unit, k, seed)

# ---------------------------------------------------------------------------------- fast: edge matching


class _Fragments:
    """Path fragments under construction: two neighbour slots per node and a union-find over fragments."""

    def __init__(self, n: int):
        self.n = n
        self.parent = list(range(n))
        self.left = [-1] * n
        self.right = [-1] * n
        self.edges = 0

    def root(self, v: int) -> int:
        parent = self.parent
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        return v

    def add_best(self, a: Tensor, c: Tensor, sim: Tensor) -> int:
        """Greedy edge matching: scan edges by decreasing similarity, keep those that extend two path ends."""
        a, c, sim = _unique_edges(a, c, sim, self.n)
        order = torch.argsort(sim, descending=True, stable=True)
        left, right, added = self.left, self.right, 0
        for u, v in zip(a[order].tolist(), c[order].tolist()):
            if right[u] >= 0 or right[v] >= 0:
                continue
            ru, rv = self.root(u), self.root(v)
            if ru == rv:
                continue
            self.parent[ru] = rv
            for x, y in ((u, v), (v, u)):
                if left[x] < 0:
                    left[x] = y
                else:
                    right[x] = y
            added += 1
        self.edges += added
        return added

    def ends(self) -> Tensor:
        """Nodes with fewer than two neighbours (a lone node is both ends of its fragment)."""
        return torch.tensor([v for v in range(self.n) if self.right[v] < 0], dtype=torch.long)

    def paths(self) -> list[list[int]]:
        """Every fragment as a node list, each walked from its lower-index end, in order of that end."""
        seen = bytearray(self.n)
        out = []
        for v in range(self.n):
            if seen[v] or self.right[v] >= 0:
                continue
            path, prev, cur = [], -1, v
            while cur >= 0:
                path.append(cur)
                seen[cur] = 1
                nxt = self.left[cur] if self.left[cur] != prev else self.right[cur]
                prev, cur = cur, nxt
            out.append(path)
        return out

def _unique_edges(a: Tensor, c: Tensor, sim: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Drop self loops and the second copy of edges listed from both ends."""
    keep = a != c
    a, c, sim = a[keep], c[keep], sim[keep]
    key = torch.minimum(a, c) * n + torch.maximum(a, c)
    _, first = np.unique(key.numpy(), return_index=True)
    first = torch.from_numpy(np.sort(first))
    return a[first], c[first], sim[first]

def _matching_path(unit: Tensor, idx: Tensor, sim: Tensor, seed: int) -> Tensor:
    """A chain by greedy edge matching over the neighbour lists, fragments joined level by level."""
    n, k = idx.shape
    frags = _Fragments(n)
    frags.add_best(torch.arange(n).repeat_interleave(k), idx.reshape(-1), sim.reshape(-1))
    while frags.edges < n - 1:
        ends = frags.ends()
        end_idx, end_sim = _neighbours(unit[ends], k, seed)
        kk = end_idx.shape[1]
        if frags.add_best(ends.repeat_interleave(kk), ends[end_idx.reshape(-1)], end_sim.reshape(-1)) == 0:
            break  # cannot happen with exact lists; concatenating what is left is then the fallback
    return torch.tensor([v for path in frags.paths() for v in path], dtype=torch.long)

# ------------------------------------------------------------------------------------- fast: refinement


class _Cycle:
    """The chain closed into a cycle through a sentinel node of zero vector (similarity 0 to all), so the
    chain's two free ends need no special case in the moves."""

    def __init__(self, unit: Tensor, order: Tensor):
        n = unit.shape[0]
        self.sentinel = n
        self.vec = torch.cat([unit, unit.new_zeros(1, unit.shape[1])])
        self.np_vec = self.vec.numpy()
        self.ring = np.concatenate([[n], order.numpy()]).astype(np.int64)
        self.size = n + 1
        self.pos = np.empty(self.size, dtype=np.int64)
        self.pos[self.ring] = np.arange(self.size)

    def chain(self) -> Tensor:
        s = int(self.pos[self.sentinel])
        return torch.from_numpy(np.concatenate([self.ring[s + 1:], self.ring[:s]]).copy())

    def dots(self, a: Tensor, b: Tensor) -> Tensor:
        return (self.vec[a] * self.vec[b]).sum(-1)

    def dot(self, a: int, b: int) -> float:
        return float(self.np_vec[a] @ self.np_vec[b])

    def succ(self) -> Tensor:
        nxt = np.empty(self.size, dtype=np.int64)
        nxt[self.ring] = np.roll(self.ring, -1)
        return torch.from_numpy(nxt)

    def reverse(self, i: int, j: int) -> None:
        """Reverse the ring from position i to j (inclusive, forward, wrapping); the shorter side is flipped,
        which is the same cycle."""
        length = (j - i) % self.size + 1
        if 2 * length > self.size:
            i, j, length = (j + 1) % self.size, (i - 1) % self.size, self.size - length
        spots = (i + np.arange(length)) % self.size
        nodes = self.ring[spots][::-1]
        self.ring[spots] = nodes
        self.pos[nodes] = spots

def _two_opt_round(cyc: _Cycle, idx: Tensor) -> int:
    """One round of 2-opt over neighbour pairs (a, c): replace edges (a, a+), (c, c+) by (a, c), (a+, c+)
    (or the same with predecessors). Candidates are scored at once, then applied best first, each
    re-scored on the current cycle and applied only on a strict gain."""
    n, k = idx.shape
    a = torch.arange(n).repeat_interleave(k)
    c = idx.reshape(-1)
    keep = a != c
    a, c = a[keep], c[keep]
    ring, pos, size = torch.from_numpy(cyc.ring), torch.from_numpy(cyc.pos), cyc.size
    pa, pc = pos[a], pos[c]
    new_ac = cyc.dots(a, c)
    gains = []
    for shift in (1, -1):
        an, cn = ring[(pa + shift) % size], ring[(pc + shift) % size]
        gains.append(new_ac + cyc.dots(an, cn) - cyc.dots(a, an) - cyc.dots(c, cn))
    gain = torch.cat(gains)
    pick = (gain > _GAIN_EPS).nonzero().squeeze(1)
    pick = pick[torch.argsort(gain[pick], descending=True, stable=True)]
    m = a.numel()
    a_list, c_list = a.tolist(), c.tolist()
    applied = 0
    for flat in pick.tolist():
        shift = 1 if flat < m else -1
        u, v = a_list[flat % m], c_list[flat % m]
        pu, pv = int(cyc.pos[u]), int(cyc.pos[v])
        un, vn = int(cyc.ring[(pu + shift) % size]), int(cyc.ring[(pv + shift) % size])
        if un == v or vn == u:
            continue
        if cyc.dot(u, v) + cyc.dot(un, vn) - cyc.dot(u, un) - cyc.dot(v, vn) <= _GAIN_EPS:
            continue
        if shift == 1:
            cyc.reverse((pu + 1) % size, pv)  # u, [u+ .. v], v+  ->  u, v .. u+, v+
        else:
            cyc.reverse(pu, (pv - 1) % size)  # u-, [u .. v-], v  ->  u-, v- .. u, v
        applied += 1
    return applied

def _or_opt_round(cyc: _Cycle, idx: Tensor) -> tuple[int, Tensor]:
    """One round of Or-opt: move a run of 1-3 nodes between a neighbour u of one of its ends and u's
    successor or predecessor, in whichever orientation puts that end next to u. Candidates are scored at
    once and applied best first; a candidate is skipped once any node it involves has moved this round,
    which keeps every applied gain exact."""
    nxt = cyc.succ()
    prv = torch.empty_like(nxt)
    prv[nxt] = torch.arange(cyc.size)
    moves = _or_opt_moves(cyc, idx, nxt, prv)
    if not moves:
        return 0, cyc.chain()
    return _apply_or_opt_moves(cyc, moves, nxt, prv)

def _or_opt_moves(cyc: _Cycle, idx: Tensor, nxt: Tensor, prv: Tensor) -> list[tuple[Any, ...]]:
    """Every improving Or-opt candidate of one round, scored at once: (gains, heads, targets, length,
    forward, side)."""
    n = idx.shape[0]
    s = cyc.sentinel
    edge = cyc.dots(torch.arange(cyc.size), nxt)  # edge[v] = sim(v, nxt[v])
    t = torch.arange(n)
    moves = []
    for forward, length in ((True, 1), (True, 2), (True, 3), (False, 2), (False, 3)):
        step, back = (nxt, prv) if forward else (prv, nxt)
        run = [t]
        for _ in range(length - 1):
            run.append(step[run[-1]])
        run_t = torch.stack(run, 1)
        end, before = run[-1], back[t]
        after = step[end]
        ok = ~(run_t[:, 1:] == s).any(1) & (after != t) & (before != end)
        cut = cyc.dots(before, after) - (edge[before] if forward else edge[t]) - (edge[end] if forward else edge[after])
        for side in (0, 1):
            w = nxt[idx] if side == 0 else prv[idx]
            old = edge[idx] if side == 0 else edge[w]
            gain = cut[:, None] + cyc.dots(idx, t[:, None]) + cyc.dots(end[:, None], w) - old
            bad = (run_t[:, None, :] == idx[:, :, None]).any(2) | (run_t[:, None, :] == w[:, :, None]).any(2)
            bad |= ~ok[:, None] | (idx == t[:, None])
            gain = gain.masked_fill(bad, -1.0)
            rows, cols = (gain > _GAIN_EPS).nonzero(as_tuple=True)
            if rows.numel():
                moves.append((gain[rows, cols], rows, idx[rows, cols], length, forward, side))
    return moves

def _apply_or_opt_moves(cyc: _Cycle, moves: list[tuple[Any, ...]], nxt: Tensor, prv: Tensor) -> tuple[int, Tensor]:
    """Apply the candidates best first, skipping any that touches a node already moved this round (so each
    applied gain stays exact); returns how many were applied and the new chain."""
    s = cyc.sentinel
    gain = torch.cat([m[0] for m in moves])
    meta = [(m[3], m[4], m[5]) for m in moves for _ in range(m[0].numel())]
    heads = torch.cat([m[1] for m in moves]).tolist()
    targets = torch.cat([m[2] for m in moves]).tolist()
    nx, pv = nxt.tolist(), prv.tolist()
    moved = bytearray(cyc.size)
    applied = 0
    for flat in torch.argsort(gain, descending=True, stable=True).tolist():
        length, forward, side = meta[flat]
        head, u = heads[flat], targets[flat]
        step, back = (nx, pv) if forward else (pv, nx)
        run = [head]
        for _ in range(length - 1):
            run.append(step[run[-1]])
        before, after = back[head], step[run[-1]]
        w = nx[u] if side == 0 else pv[u]
        if moved[before] or moved[after] or moved[u] or moved[w] or any(moved[v] for v in run):
            continue
        lo, hi = (before, after) if forward else (after, before)
        nx[lo], pv[hi] = hi, lo
        path = [u, *run, w] if side == 0 else [w, *run[::-1], u]
        for x, y in zip(path[:-1], path[1:]):
            nx[x], pv[y] = y, x
        for v in (before, after, *path):
            moved[v] = 1
        applied += 1
    order, v = [], nx[s]
    while v != s:
        order.append(v)
        v = nx[v]
    return applied, torch.tensor(order, dtype=torch.long)

def _refine(unit: Tensor, order: Tensor, idx: Tensor, two_opt_rounds: int, or_opt_rounds: int) -> Tensor:
    """2-opt rounds, then Or-opt rounds; every applied move strictly raises the chain's total similarity."""
    if unit.shape[0] < 4:
        return order
    cyc = _Cycle(unit, order)
    for _ in range(two_opt_rounds):
        if _two_opt_round(cyc, idx) == 0:
            break
    order = cyc.chain()
    for _ in range(or_opt_rounds):
        applied, order = _or_opt_round(_Cycle(unit, order), idx)
        if applied == 0:
            break
    return order

def fast_chain(vectors: Tensor, seed: int = 0, neighbours: int = NEIGHBOURS,
               two_opt_rounds: int = TWO_OPT_ROUNDS, or_opt_rounds: int = OR_OPT_ROUNDS) -> Tensor:
    """A high-similarity chain through all vectors in near-linear time (see the module docstring)."""
    unit = unit_rows(vectors)
    nonzero = unit.abs().sum(1) > 0
    live, zero = nonzero.nonzero().squeeze(1), (~nonzero).nonzero().squeeze(1)
    if live.numel() <= 2:
        return torch.cat([live, zero])
    sub = unit[live]
    with _single_thread():
        idx, sim = _neighbours(sub, neighbours, seed)
        order = _matching_path(sub, idx, sim, seed)
        order = _refine(sub, order, idx[:, : max(1, neighbours // 2)], two_opt_rounds, or_opt_rounds)
    return torch.cat([live[order], zero])  # zero kernels (cosine 0 to all) cost least as one block at the end

# ---------------------------------------------------------------------------------------- lkh: reference


def _lkh_problem(unit: Tensor) -> str:
    """TSPLIB text of the chain as a tour: distances round(LKH_SCALE * (1 - cos)), plus one node at distance
    0 to all, whose two tour edges become the open chain's free ends. elkai reads FULL_MATRIX only."""
    n = unit.shape[0]
    dist = torch.zeros(n + 1, n + 1, dtype=torch.long)
    dist[:n, :n] = torch.round((1 - unit.double() @ unit.double().t()) * LKH_SCALE).long()
    dist.fill_diagonal_(0)
    rows = "\n".join(" ".join(map(str, row)) for row in dist.tolist())
    return (f"TYPE : TSP\nDIMENSION : {n + 1}\nEDGE_WEIGHT_TYPE : EXPLICIT\nEDGE_WEIGHT_FORMAT : FULL_MATRIX\n"
            f"EDGE_WEIGHT_SECTION\n{rows}\nEOF\n")

def lkh_chain(vectors: Tensor, time_limit_s: float = 10.0, seed: int = 0) -> Tensor:
    """A near-optimal chain by LKH-3 (the elkai package), the ceiling the other methods are measured against.

    Needs the full N^2 distance matrix, so it refuses more than LKH_MAX vectors. `time_limit_s` bounds LKH's
    search in CPU seconds (wall time on a loaded machine is longer); building the matrix and LKH's
    candidate-set ascent (O(N^2) per step) come on top.
    """
    from elkai import _elkai

    n = vectors.shape[0]
    if n > LKH_MAX:
        raise NernError(f"method 'lkh' takes at most {LKH_MAX} kernels per layer (it needs the full distance "
                        f"matrix), got {n}; use method 'fast' or 'auto' for this layer")
    if n <= 2:
        return torch.arange(n)
    params = (f"PROBLEM_FILE = :stdin:\nRUNS = 1\nSEED = {seed + 1}\nTIME_LIMIT = {time_limit_s}\n"
              "INITIAL_PERIOD = 100\nMAX_CANDIDATES = 5\n")
    tour = [v - 1 for v in _elkai.solve_problem(params, _lkh_problem(unit_rows(vectors)))]
    cut = tour.index(n)
    return torch.tensor(tour[cut + 1:] + tour[:cut], dtype=torch.long)

# --------------------------------------------------------------------------------------- the method choice


def check_method(method: str) -> None:
    if method not in METHODS:
        raise NernError(f"unknown permutation method '{method}'; choose one of {', '.join(METHODS)}")

def find_chain(vectors: Tensor, method: str = "auto", seed: int = 0) -> Tensor:
    """The chain through `vectors` by the chosen method (see the module docstring)."""
    check_method(method)
    if method == "greedy":
        return greedy_chain(vectors)
    if method == "lkh":
        return lkh_chain(vectors, LKH_TIME_LIMIT_S, seed)
    fast = fast_chain(vectors, seed=seed)
    if method == "fast" or vectors.shape[0] > AUTO_EXACT_MAX:
        return fast
    exact = greedy_chain(vectors)
    return fast if chain_quality(vectors, fast) > chain_quality(vectors, exact) else exact
