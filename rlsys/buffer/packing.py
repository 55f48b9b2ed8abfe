"""Micro-batches for the trainer: padded rows or packed rows, one interface.

A batch lives in a padded [B, Lmax] layout (`TrainBatch`, one row per sample). A `MicroBatch`
is a set of samples laid out for one forward pass, plus the index maps back to that layout:

- padded: one row per sample, right-padded to the longest in the micro-batch;
- packed: samples concatenated into one row of at most `max_tokens` tokens, position ids
  restarting at 0 for each sample and a block-diagonal causal mask, so no token attends across
  samples and no compute goes to padding.

`gather` moves any per-token tensor from the batch layout into the micro-batch layout and
`scatter` moves results back, so losses and no-grad passes are written once for both layouts.
Bins are filled first-fit decreasing (FFD: within 11/9 OPT + 6/9 bins of the optimum), and
`balance` spreads bins over ranks by token count with the largest-differencing method
(Karmarkar-Karp).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch


@dataclass
class MicroBatch:
    input_ids: torch.Tensor  # [R, L] int64
    position_ids: torch.Tensor  # [R, L] int64, restarting per sample
    attention_mask: torch.Tensor  # [R, L] 0/1 (padded) or [R, 1, L, L] bool (packed)
    src_b: torch.Tensor  # [R, L] sample row in the batch layout (0 where invalid)
    src_t: torch.Tensor  # [R, L] position in that row (0 where invalid)
    valid: torch.Tensor  # [R, L] bool, False on padding
    samples: list[int]  # batch rows in this micro-batch
    cu_seqlens: torch.Tensor | None = None  # packed: [n + 1] int32 sample offsets in the row

    @property
    def num_tokens(self) -> int:
        return int(self.valid.sum())

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Lmax] batch-layout tensor -> [R, L] (zeros on padding)."""
        out = x[self.src_b, self.src_t]
        return torch.where(self.valid, out, torch.zeros_like(out))

    def scatter(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write [R, L] values into the batch-layout tensor `out` [B, Lmax]; returns `out`."""
        out[self.src_b[self.valid], self.src_t[self.valid]] = y[self.valid].to(out.dtype)
        return out


def first_fit_decreasing(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` grouped into bins of total <= max_tokens (an item longer than
    max_tokens gets a bin of its own). Deterministic: ties keep index order."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def balance(weights: list[int], k: int) -> list[list[int]]:
    """Partition item indices into k sets of near-equal total weight (Karmarkar-Karp's
    largest differencing method, k-way): repeatedly merge the two partial partitions whose
    spread is largest, pairing heaviest subsets with lightest."""
    if k <= 1:
        return [list(range(len(weights)))]
    # each entry: (-spread, tiebreak, [ (sum, items) * k ] sorted by sum descending)
    heap = []
    for i, w in enumerate(weights):
        parts = [(w, [i])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-w, i, parts))
    tie = len(weights)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(a[j][0] + b[k - 1 - j][0], a[j][1] + b[k - 1 - j][1]) for j in range(k)]
        merged.sort(key=lambda p: -p[0])
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), tie, merged))
        tie += 1
    parts = heap[0][2] if heap else [(0, []) for _ in range(k)]
    return [sorted(p[1]) for p in parts]


def pack_bins(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices of `lengths` in as many bins as first-fit-decreasing needs: FFD's fullest bin
    first, then the other items, longest first, cut into runs of near-equal token counts.

    Why: a step's peak memory is that of its worst micro-batch, and every micro-batch after
    the first runs beside the gradients accumulated so far; FFD fills its later bins to the
    brim too and leaves the rest to the last (quickstart: 2048 + 2024 + 157 tokens -> 2048 +
    1091 + 1090). Runs of the length order keep each row's samples of similar lengths, as
    FFD's rows are: the CPU attention pads each row's samples to their length group's
    longest, and rows of mixed lengths peaked higher at the same token count. FFD's own bins
    are kept when a run would hold more tokens than FFD's fullest later bin (or over
    `max_tokens`, an item alone excepted)."""
    bins = first_fit_decreasing(lengths, max_tokens)
    bins.sort(key=lambda b: -sum(lengths[i] for i in b))  # stable: ties keep FFD's order
    if len(bins) < 3:
        return bins
    rest = sorted((i for b in bins[1:] for i in b), key=lambda i: (-lengths[i], i))
    runs = _even_runs([lengths[i] for i in rest], len(bins) - 1)
    parts = [sorted(rest[a:b]) for a, b in runs]
    cap = max(sum(lengths[i] for i in b) for b in bins[1:])
    for p in parts:
        n = sum(lengths[i] for i in p)
        if not p or n > cap or (n > max_tokens and len(p) > 1):
            return bins
    return [bins[0], *parts]


def _even_runs(sizes: list[int], k: int) -> list[tuple[int, int]]:
    """[start, end) of k consecutive runs of `sizes` with near-equal sums: each run takes the
    next item while that brings its sum closer to (what is left) / (runs left)."""
    runs, start, left = [], 0, sum(sizes)
    for j in range(k - 1):
        target, acc, end = left / (k - j), 0, start
        while end < len(sizes) - (k - 1 - j) and (
            end == start or abs(acc + sizes[end] - target) < abs(acc - target)
        ):
            acc += sizes[end]
            end += 1
        runs.append((start, end))
        start, left = end, left - acc
    runs.append((start, len(sizes)))
    return runs


def padded_micro_batch(
    lengths: torch.Tensor, rows: list[int], input_ids: torch.Tensor
) -> MicroBatch:
    """One row per sample, right-padded to the longest of `rows`."""
    idx = torch.tensor(rows)
    lens = lengths[idx]
    width = int(lens.max())
    t = torch.arange(width).expand(len(rows), width)
    valid = t < lens[:, None]
    src_b = idx[:, None].expand(len(rows), width)
    src_t = torch.where(valid, t, torch.zeros_like(t))
    ids = torch.where(valid, input_ids[src_b, src_t], torch.zeros_like(src_t))
    return MicroBatch(ids, src_t.clone(), valid.long(), src_b, src_t, valid, list(rows))


def packed_micro_batch(
    lengths: torch.Tensor, rows: list[int], input_ids: torch.Tensor
) -> MicroBatch:
    """`rows` concatenated into a single row with a block-diagonal causal mask."""
    lens = [int(lengths[r]) for r in rows]
    total = sum(lens)
    src_b = torch.cat(
        [torch.full((n,), r, dtype=torch.long) for r, n in zip(rows, lens, strict=True)]
    )
    src_t = torch.cat([torch.arange(n) for n in lens])
    seg = torch.cat([torch.full((n,), j) for j, n in enumerate(lens)])
    causal = torch.ones(total, total, dtype=torch.bool).tril()
    mask = (seg[:, None] == seg[None, :]) & causal
    valid = torch.ones(1, total, dtype=torch.bool)
    return MicroBatch(
        input_ids[src_b, src_t][None],
        src_t[None].clone(),
        mask[None, None],
        src_b[None],
        src_t[None],
        valid,
        list(rows),
        torch.tensor([0, *lens], dtype=torch.int32).cumsum(0, dtype=torch.int32),
    )


def micro_batches(
    lengths: torch.Tensor,
    rows: list[int],
    input_ids: torch.Tensor,
    packing: bool,
    max_tokens: int,
    max_samples: int,
) -> list[MicroBatch]:
    """Split `rows` of a batch into micro-batches: packed bins of <= max_tokens tokens
    (`pack_bins`: the first the fullest, the others even), or padded chunks of <= max_samples
    samples."""
    if packing:
        bins = pack_bins([int(lengths[r]) for r in rows], max_tokens)
        return [packed_micro_batch(lengths, [rows[i] for i in b], input_ids) for b in bins]
    return [
        padded_micro_batch(lengths, rows[i : i + max_samples], input_ids)
        for i in range(0, len(rows), max_samples)
    ]


def rank_micro_batches(
    lengths: torch.Tensor,
    rows: list[int],
    input_ids: torch.Tensor,
    packing: bool,
    max_tokens: int,
    max_samples: int,
    rank: int,
    world: int,
) -> tuple[list[MicroBatch], int]:
    """This rank's micro-batches of `rows`, and the largest count on any rank.

    Rows are split across ranks by token count (`balance`), then micro-batched. Every rank
    computes the same split, so each knows how many micro-batches the busiest rank has and can
    pad its own list to that count (ZeRO-2/3 communicate inside every forward/backward, so all
    ranks must run the same number)."""
    if world == 1:
        mbs = micro_batches(lengths, rows, input_ids, packing, max_tokens, max_samples)
        return mbs, len(mbs)
    parts = balance([int(lengths[r]) for r in rows], world)
    counts = []
    for part in parts:
        n = len(part)
        if packing:
            counts.append(len(pack_bins([int(lengths[rows[i]]) for i in part], max_tokens)))
        else:
            counts.append(-(-n // max_samples))
    mine = [rows[i] for i in parts[rank]]
    mbs = micro_batches(lengths, mine, input_ids, packing, max_tokens, max_samples) if mine else []
    return mbs, max(max(counts), 1)
