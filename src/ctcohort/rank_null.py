"""Two-sided P of Spearman's rank correlation that is valid at every n.

The null hypothesis is random pairing: every one of the n! pairings of x with y is equally likely.
The statistic is the centred rank product S = sum((2 rank_x - n - 1)(2 rank_y - n - 1)), an integer
even with midranks (a midrank is a multiple of 1/2) and monotone in rs, because the rank variances do
not change under re-pairing; P = P(|S*| >= |S|). Without ties S = 4 T - n (n + 1)^2 with
T = sum(rank_x * rank_y).

``spearman_p`` picks the branch by n (finite x, y, n >= 3, neither constant):

- n <= ENUMERATION_MAX_N (9), ties or not: "exact", every pairing enumerated (``enumerated_p``;
  9! = 362,880 pairings, 0.02 s a test, 0.1 s for the first at a given n). Smallest P: 2/n! (the
  observed pairing and its reverse).
- TABLE_MIN_N (10) <= n <= TABLE_MAX_N (20) without ties in x nor y: "exact", from the shipped
  distribution of T over all n! permutations (resources/spearman/exact_null.tsv, written by
  ``write_exact_null_table`` / ``python -m ctcohort.rank_null``; a dynamic program over subsets,
  ``exact_null_counts``; n = 20 takes about 50 s and 2.5 GB, all of 10..20 about 80 s). Integer
  arithmetic throughout. Smallest P: 2/n! (5.5e-7 at n = 10).
- n <= PERMUTATION_MAX_N (30) otherwise (ties at 10-20, any data at 21-30): "permutation", a seeded
  Monte Carlo over PERMUTATION_RESAMPLES random pairings, P = (b + 1) / (B + 1) with b the resamples
  with |S*| >= |S| (``pairing_p``, 10-25 ms a test). The plus-one form keeps it a valid P
  (Prob(P <= alpha) <= alpha). Smallest P: 1/(B + 1) = 1.0e-5, so a Bonferroni-corrected P over m
  tests is at least m/(B + 1): at the paper's alpha 1e-4 no such test passes once m > 10.
- n > 30: "t", scipy.stats.spearmanr's t approximation, floored at 2/n! (it says P = 0 at |rs| = 1).
  Smallest P: 2/n!.

Why not the t approximation below 30 scans: it is anti-conservative there. Near an exact P of 1e-4 the
ratio t-P / exact-P is 0.21 at n = 10, 0.44 at 14, 0.55 at 20 and 0.61 at 29; near 3e-7 at n = 12 it is
0.02. No branch returns a P below 2/n!, the exact minimum.
"""

import functools
import itertools
import math
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from ctcohort.resources import resources_dir
from ctcohort.tables import read_tsv, write_tsv

ENUMERATION_MAX_N = 9
TABLE_MIN_N = 10
# 20! = 2.4e18 still fits int64 counts; the DP's middle layer at n = 20 holds about 1 GB.
TABLE_MAX_N = 20
# The t approximation is still 0.61 of the exact P near 1e-4 at n = 29; above 30 it is used as is.
PERMUTATION_MAX_N = 30
# About 25 ms a test at n = 30 (10 ms at n = 10); the floor 1/(B + 1) is 1.0e-5. 10x B: 10x the time.
PERMUTATION_RESAMPLES = 100_000
PERMUTATION_CHUNK = 10_000
# Float statistics (midrank residuals) equal in exact arithmetic may differ by rounding.
RELATIVE_TOLERANCE = 1e-9
EXACT, PERMUTATION, T_APPROXIMATION = "exact", "permutation", "t"
TABLE_HEADER = """\
# Exact null distribution of Spearman's statistic T = sum_i i * pi(i) over all n! permutations pi of
# 1..n, for n = {first}..{last} (no ties): count = the number of permutations with that T (only nonzero
# counts; they sum to n!). Used by ctcohort.rank_null.spearman_p for tie-free data at 10 <= n <= 20.
# Regenerate: python -m ctcohort.rank_null  (dynamic program over subsets, ctcohort.rank_null.exact_null_counts)
"""


def exact_null_path() -> Path:
    return resources_dir() / "spearman" / "exact_null.tsv"


def centred_ranks(values) -> np.ndarray:
    """2 rank - n - 1 as integers (midranks for ties): they sum to 0, so S is a plain product sum."""
    n = len(values)
    return np.rint(2 * stats.rankdata(values) - (n + 1)).astype(np.int64)


@functools.lru_cache(maxsize=ENUMERATION_MAX_N + 1)
def all_permutations(n: int) -> np.ndarray:
    """(n!, n) int8 array of every permutation of 0..n-1."""
    flat = itertools.chain.from_iterable(itertools.permutations(range(n)))
    return np.fromiter(flat, dtype=np.int8, count=n * math.factorial(n)).reshape(-1, n)


def enumerated_p(x, y) -> float:
    """Exact two-sided P(|S*| >= |S|) over all n! pairings of x with y (ties included), n <= 9."""
    n = len(x)
    if n > ENUMERATION_MAX_N:
        raise ValueError(f"enumeration is for n <= {ENUMERATION_MAX_N}, got n = {n}")
    cx, cy = centred_ranks(x), centred_ranks(y)
    observed = abs(int(cx @ cy))
    permuted = np.abs(cx[all_permutations(n)] @ cy)
    return int(np.count_nonzero(permuted >= observed)) / math.factorial(n)


# --- the exact table: dynamic program over subsets --------------------------------------------------


def partial_sum_range(n: int, k: int) -> tuple[int, int]:
    """Smallest and largest sum_{i<=k} i * pi(i) over injective pi: positions 1..k -> values 1..n."""
    low = sum(i * (k + 1 - i) for i in range(1, k + 1))  # values 1..k in falling order
    high = sum(i * (n - k + i) for i in range(1, k + 1))  # values n-k+1..n in rising order
    return low, high


def exact_null_counts(n: int, chunk_rows: int = 16_384) -> tuple[np.ndarray, np.ndarray]:
    """(t, count): the number of permutations pi of 1..n with sum_i i * pi(i) = t, for every t with count > 0.

    Layer k holds, for each k-subset (bit mask) of values given to positions 1..k, the counts of the partial
    sums, offset by the layer's smallest partial sum. Position k + 1 takes a value v not in the mask and
    adds (k + 1) v. For one v each target mask has exactly one source mask, so the fancy-indexed += never
    hits a row twice.
    """
    if not 1 <= n <= TABLE_MAX_N:
        raise ValueError(f"the table is for 1 <= n <= {TABLE_MAX_N}, got n = {n}")
    popcount = np.zeros(1 << n, dtype=np.int8)
    for bit in range(n):
        popcount[1 << bit : 1 << (bit + 1)] = popcount[: 1 << bit] + 1
    row_of = np.zeros(1 << n, dtype=np.int64)
    masks = np.array([0], dtype=np.int64)
    counts = np.ones((1, 1), dtype=np.int64)
    low = 0
    for k in range(n):
        next_masks = np.flatnonzero(popcount == k + 1)
        row_of[next_masks] = np.arange(len(next_masks))
        next_low, next_high = partial_sum_range(n, k + 1)
        next_counts = np.zeros((len(next_masks), next_high - next_low + 1), dtype=np.int64)
        for value in range(1, n + 1):
            bit = 1 << (value - 1)
            sources = np.flatnonzero((masks & bit) == 0)
            shift = low + (k + 1) * value - next_low  # column of partial sum `low` in the next layer
            add_shifted_rows(next_counts, row_of[masks[sources] | bit], counts, sources, shift, chunk_rows)
        masks, counts, low = next_masks, next_counts, next_low
    (row,) = counts
    nonzero = np.flatnonzero(row)
    return nonzero + low, row[nonzero]


def add_shifted_rows(target, target_rows, source, source_rows, shift, chunk_rows) -> None:
    """target[target_rows, j + shift] += source[source_rows, j], clipped to target's columns (the clipped
    entries are zero: they are partial sums the mask cannot reach), in chunks to bound the temporaries."""
    first = max(0, -shift)
    last = min(source.shape[1], target.shape[1] - shift)
    for start in range(0, len(source_rows), chunk_rows):
        rows = slice(start, start + chunk_rows)
        target[target_rows[rows], first + shift : last + shift] += source[source_rows[rows], first:last]


def write_exact_null_table(path=None, sizes=range(TABLE_MIN_N, TABLE_MAX_N + 1), log=print) -> Path:
    """Compute the exact null distribution for each n in ``sizes`` and write it as a TSV (n, t, count)."""
    path = Path(path) if path else exact_null_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    blocks = []
    for n in sizes:
        started = time.perf_counter()
        t, count = exact_null_counts(n)
        if int(count.sum(dtype=np.uint64)) != math.factorial(n):
            raise AssertionError(f"n = {n}: counts do not sum to n!")
        blocks.append(pd.DataFrame({"n": n, "t": t, "count": count}))
        log(f"n = {n}: {len(t)} values of T in {time.perf_counter() - started:.1f} s")
    with open(path, "w") as handle:
        handle.write(TABLE_HEADER.format(first=min(sizes), last=max(sizes)))
        write_tsv(pd.concat(blocks), handle)
    return path


@functools.lru_cache(maxsize=1)
def exact_null_table() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The shipped table as {n: (t, count)} (read once)."""
    table = read_tsv(exact_null_path(), comment="#", dtype="int64")
    return {int(n): (block["t"].to_numpy(), block["count"].to_numpy()) for n, block in table.groupby("n")}


def table_p(x, y) -> float:
    """Exact two-sided P(|T - E T| >= |t - E T|) from the shipped table; x, y without ties, 10 <= n <= 20."""
    n = len(x)
    t_values, counts = exact_null_table()[n]
    deviations = np.abs(4 * t_values - n * (n + 1) ** 2)  # 4 (T - E T), an integer
    observed = abs(int(centred_ranks(x) @ centred_ranks(y)))  # S = 4 (t - E T)
    at_least = int(counts[deviations >= observed].sum())
    return at_least / math.factorial(n)


# --- Monte Carlo over random pairings ---------------------------------------------------------------


def permutation_orders(n: int, resamples: int = PERMUTATION_RESAMPLES, seed: int = 0):
    """Random orders of range(n), PERMUTATION_CHUNK at a time (arrays of shape chunk x n), ``resamples`` in
    all; the same for the same seed."""
    rng = np.random.default_rng(seed)
    for start in range(0, resamples, PERMUTATION_CHUNK):
        size = min(PERMUTATION_CHUNK, resamples - start)
        yield rng.permuted(np.broadcast_to(np.arange(n), (size, n)), axis=1)


def pairing_p(a, b, seed: int = 0, resamples: int = PERMUTATION_RESAMPLES) -> float:
    """Monte Carlo P(|sum(a * b*)| >= |sum(a * b)|) over random re-pairings b* of b: (hits + 1) / (resamples + 1).

    Deterministic for a given seed. Statistics within RELATIVE_TOLERANCE of |sum(a * b)|, relative to its
    largest possible value sqrt(sum a^2 sum b^2), count as equal (rounding of float scores).
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"a and b must be 1-D of the same length, got shapes {a.shape} and {b.shape}")
    threshold = abs(a @ b) - RELATIVE_TOLERANCE * math.sqrt((a @ a) * (b @ b))
    hits = sum(
        np.count_nonzero(np.abs(b[order] @ a) >= threshold) for order in permutation_orders(len(b), resamples, seed)
    )
    return (hits + 1) / (resamples + 1)


# --- the choice of branch ---------------------------------------------------------------------------


def smallest_p(n: int) -> float:
    """2/n!: the exact two-sided P of a perfect order of n, below which no pairing test of n can go (the floor of
    every P that an approximation or a Monte Carlo gives)."""
    return 2 / math.factorial(n)


def has_ties(values: np.ndarray) -> bool:
    return len(np.unique(values)) < len(values)


def spearman_p(x, y, seed: int = 0, resamples: int = PERMUTATION_RESAMPLES) -> tuple[float, str]:
    """Two-sided P of Spearman's rs and the method ("exact", "permutation" or "t"); see the module docstring.

    x, y: finite, of the same length n >= 3, neither constant.
    """
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n = len(x)
    if x.shape != y.shape or x.ndim != 1 or n < 3:
        raise ValueError(f"x and y must be 1-D of the same length >= 3, got shapes {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("x and y must be finite")
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        raise ValueError("rs is undefined for a constant x or y")
    if n <= ENUMERATION_MAX_N:
        return enumerated_p(x, y), EXACT
    if n <= TABLE_MAX_N and not has_ties(x) and not has_ties(y):
        return table_p(x, y), EXACT
    smallest = smallest_p(n)
    if n <= PERMUTATION_MAX_N:
        # 1/(B + 1) exceeds 2/n! for any practical B; the max only guards an absurdly large one.
        p = pairing_p(centred_ranks(x), centred_ranks(y), seed, resamples)
        return max(p, smallest), PERMUTATION
    return max(float(stats.spearmanr(x, y).pvalue), smallest), T_APPROXIMATION


def main(argv=None) -> int:
    """python -m ctcohort.rank_null [PATH]: regenerate the exact null table (default: the shipped one)."""
    argv = sys.argv[1:] if argv is None else argv
    path = write_exact_null_table(argv[0] if argv else None)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
