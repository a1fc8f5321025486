"""Token-budget micro-batches (``max_tokens_per_micro_batch``): rows partitioned by their token counts, each
micro-batch padded to its own longest row, every data-parallel rank with the same number of micro-batches.

Pure functions of row lengths (no tensors, no process group): every rank knows every rank's rows, so each
computes the agreed count itself and no collective is needed.

Cost model: a micro-batch of rows with lengths l_1..l_n costs ``n x max(l)`` tokens (padding counted), which is
what it holds in memory. That cost is not additive, so a balanced partition of summed lengths (Karmarkar-Karp, as
verl uses for packed sequences) is the wrong objective here: it mixes long and short rows and pays the short
rows' padding. Instead, runs of the rows sorted by length:

- Any partition can be rearranged into runs of the length-sorted rows with the same part sizes without raising
  any part's tokens (give the part with the i-th longest maximum the next |part| rows of the sorted order: the
  first row it gets is no longer than its old maximum, since the parts before it hold too few rows to contain
  every row longer than that maximum). So runs lose nothing.
- Over runs, the greedy (open a run at the longest remaining row L, add rows while (n + 1) x L fits the cap)
  gives the fewest runs under a cap; a binary search for the smallest cap that needs at most ``count`` runs,
  then splitting the largest runs until there are exactly ``count``, gives the smallest possible largest
  micro-batch for that count: balanced in the sense that matters for memory and for the pipeline's slowest
  micro-batch.
"""

from __future__ import annotations


def micro_batch_tokens(lengths: list[int]) -> int:
    """Tokens of one micro-batch of rows with these lengths: rows x the longest row (0 for none)."""
    return len(lengths) * max(lengths, default=0)


def check_lengths(lengths: list[int], budget: int, setting: str) -> None:
    """Refuses a budget below 1 or a row longer than the budget, naming ``setting`` and the length."""
    if budget < 1:
        raise ValueError(f"{setting}={budget}: a token budget must be >= 1 (0 turns it off)")
    longest = max(lengths, default=0)
    if longest > budget:
        raise ValueError(f"{setting}={budget} is smaller than a row of {longest} tokens (row "
                         f"{lengths.index(longest)}): every row must fit one micro-batch; raise the budget to at "
                         f"least {longest} or shorten the rows")


def _sorted_rows(lengths: list[int]) -> list[int]:
    """Row indices, longest first (ties by index: deterministic)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def _greedy_runs(ordered_lengths: list[int], cap: int) -> list[int]:
    """Sizes of the greedy runs of ``ordered_lengths`` (longest first) under ``cap`` tokens per run."""
    runs, start = [], 0
    while start < len(ordered_lengths):
        longest, size = ordered_lengths[start], 1
        while start + size < len(ordered_lengths) and (size + 1) * longest <= cap:
            size += 1
        runs.append(size)
        start += size
    return runs


def min_micro_batches(lengths: list[int], budget: int, setting: str) -> int:
    """The fewest micro-batches of at most ``budget`` tokens that hold these rows (0 for no rows)."""
    check_lengths(lengths, budget, setting)
    return len(_greedy_runs(sorted(lengths, reverse=True), budget))


def agreed_micro_batches(lengths_per_rank: list[list[int]], budget: int, setting: str) -> int:
    """The micro-batch count every data-parallel rank uses: the largest of the ranks' minimum counts (at least 1).
    ``lengths_per_rank[r]``: the row lengths of rank r, known on every rank."""
    return max([1] + [min_micro_batches(lengths, budget, setting) for lengths in lengths_per_rank])


def partition_by_tokens(lengths: list[int], budget: int, count: int, setting: str) -> list[list[int]]:
    """Row indices of ``lengths`` in exactly ``count`` micro-batches of at most ``budget`` tokens each
    (rows x that micro-batch's longest row), every row in exactly one, the largest micro-batch as small as any
    partition into ``count`` can make it (see the module docstring).

    Micro-batches come longest rows first, each listing its rows in index order. With fewer rows than ``count``,
    the last micro-batches are empty (the caller fills them with rows that carry no loss). Refuses a row longer
    than the budget, or a ``count`` below the minimum, naming ``setting``.
    """
    minimum = min_micro_batches(lengths, budget, setting)
    if count < minimum:
        raise ValueError(f"{setting}={budget}: {len(lengths)} rows need at least {minimum} micro-batches, not {count}")
    if not lengths:
        return [[] for _ in range(count)]
    order = _sorted_rows(lengths)
    ordered = [lengths[i] for i in order]
    low, high = ordered[0], budget  # the smallest cap that needs at most ``count`` runs lies in [low, high]
    while low < high:
        cap = (low + high) // 2
        if len(_greedy_runs(ordered, cap)) <= count:
            high = cap
        else:
            low = cap + 1
    runs, start = [], 0
    for size in _greedy_runs(ordered, low):
        runs.append(list(range(start, start + size)))
        start += size
    # Exactly ``count``: split the run of most tokens (halving never raises a micro-batch's tokens).
    while len(runs) < count and any(len(run) > 1 for run in runs):
        widest = max((r for r in range(len(runs)) if len(runs[r]) > 1),
                     key=lambda r: (len(runs[r]) * ordered[runs[r][0]], -r))
        run = runs[widest]
        runs[widest : widest + 1] = [run[: len(run) // 2], run[len(run) // 2 :]]
    runs += [[] for _ in range(count - len(runs))]
    return [sorted(order[p] for p in run) for run in runs]


def rank_partition(lengths_per_rank: list[list[int]], rank: int, budget: int, setting: str) -> list[list[int]]:
    """Rank ``rank``'s rows in token-budget micro-batches, as many as every other rank has
    (``agreed_micro_batches``): indices into ``lengths_per_rank[rank]``, empty micro-batches last."""
    count = agreed_micro_batches(lengths_per_rank, budget, setting)
    return partition_by_tokens(lengths_per_rank[rank], budget, count, setting)


def share_scales(weights: list[float], total: float, ranks: int) -> list[float]:
    """Loss scale of each of a rank's micro-batches: its share of the global batch (``weights[m]`` of ``total``:
    examples, or tokens) times micro-batches x data-parallel ranks, so that a micro-batch mean times its scale,
    averaged by Megatron over micro-batches and DDP over ranks, sums to the global batch's mean (0 for a
    ``total`` of 0)."""
    return [weight / total * len(weights) * ranks if total else 0.0 for weight in weights]
