"""Continual-learning metrics of an accuracy matrix (GEM, Lopez-Paz & Ranzato 2017; Chaudhry et al. 2018).

R has one row per evaluation and one column per domain: row 0 is the base model (before any
stage), row i >= 1 is after stage i. ``own[i]`` lists the columns stage i (0-based) trains on.
With T stages and one domain per stage this is exactly GEM's notation, the base row playing the
role of b (the "random initialisation" accuracies):

    ACC = 1/T  sum_i R[T, i]                       (final average accuracy, over all domains)
    BWT = 1/(T-1) sum_{i<T} (R[T, i] - R[i, i])    (backward transfer; < 0 means forgetting)
    FWT = 1/(T-1) sum_{i>1} (R[i-1, i] - b_i)      (forward transfer)
    forgetting = 1/(T-1) sum_{j<T} max_{l<T} R[l, j] - R[T, j]   (Chaudhry et al., over stage rows)
    plasticity = 1/T sum_i R[i, i]                  (how well each stage learns its own task)

Stages with several domains use the mean over their own columns.
"""

from __future__ import annotations


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def continual_metrics(R: list[list[float]], own: list[list[int]]) -> dict[str, float | None]:
    T = len(own)
    if len(R) != T + 1:
        raise ValueError(f"need {T + 1} rows (base + one per stage), got {len(R)}")
    base, final = R[0], R[T]
    col = lambda row, cols: sum(row[c] for c in cols) / len(cols)  # noqa: E731
    acc = _mean(list(final))
    bwt = _mean([col(final, own[i]) - col(R[i + 1], own[i]) for i in range(T - 1)])
    fwt = _mean([col(R[i], own[i]) - col(base, own[i]) for i in range(1, T)])
    plasticity = _mean([col(R[i + 1], own[i]) for i in range(T)])
    forgetting = _mean([max(col(R[l], own[i]) for l in range(1, T)) - col(final, own[i]) for i in range(T - 1)])
    gain = _mean([col(R[i + 1], own[i]) - col(base, own[i]) for i in range(T)])
    return {"ACC": acc, "BWT": bwt, "FWT": fwt, "forgetting": forgetting, "plasticity": plasticity,
            "mean_gain_over_base": gain}
