"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

With n samples of a problem of which c pass, pass@k = 1 - C(n-c, k) / C(n, k): the chance that k samples
drawn without replacement from the n hold at least one correct one. Computed as the product
1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge binomials.
"""

from __future__ import annotations

from collections.abc import Sequence

from mftcoder.errors import EvalError


def pass_at_k(n: int, c: int, k: int) -> float:
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n, got n={n} c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: need 1 <= k <= n, got n={n} k={k}")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


def mean_pass_at_k(results: Sequence[tuple[int, int]], k: int) -> float:
    """pass@k averaged over problems, each given as (n, c)."""
    if not results:
        return 0.0
    return sum(pass_at_k(n, c, k) for n, c in results) / len(results)


def parse_ks(text: str | None, n: int) -> list[int]:
    """The k values of `--k 1,10` (each 1 <= k <= n); without `--k`: those of 1, 10, 100 that n allows."""
    if text is None:
        return [k for k in (1, 10, 100) if k <= n]
    ks = []
    for part in text.split(","):
        part = part.strip()
        if not part.isdigit() or int(part) < 1:
            raise EvalError(f"--k {text}: expected positive integers separated by commas, e.g. --k 1,10")
        ks.append(int(part))
    if too_big := [k for k in ks if k > n]:
        raise EvalError(
            f"--k {text}: pass@{too_big[0]} needs at least {too_big[0]} samples per problem but --n is {n}; "
            f"raise --n (with --temperature > 0) or lower --k"
        )
    return sorted(set(ks))
