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

Stages with several domains use the mean over their own columns. A cell may be None (a domain
without an accuracy metric, e.g. conversation data only trained by SFT): means skip it, and a stage
none of whose own columns is defined drops out of BWT / FWT / forgetting / plasticity.

``loss_metrics`` applies the same definitions to a held-out loss matrix L (lower is better), on -L,
so that a negative loss_BWT / a positive loss_forgetting mean forgetting, as for accuracy.
"""

from __future__ import annotations


def _mean(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _diff(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def continual_metrics(R: list[list[float | None]], own: list[list[int]]) -> dict[str, float | None]:
    T = len(own)
    if len(R) != T + 1:
        raise ValueError(f"need {T + 1} rows (base + one per stage), got {len(R)}")
    base, final = R[0], R[T]
    col = lambda row, cols: _mean([row[c] for c in cols])  # noqa: E731
    acc = _mean(list(final))
    bwt = _mean([_diff(col(final, own[i]), col(R[i + 1], own[i])) for i in range(T - 1)])
    fwt = _mean([_diff(col(R[i], own[i]), col(base, own[i])) for i in range(1, T)])
    plasticity = _mean([col(R[i + 1], own[i]) for i in range(T)])
    forgetting = _mean([_diff(max((v for row in range(1, T) if (v := col(R[row], own[i])) is not None), default=None),
                              col(final, own[i])) for i in range(T - 1)])
    gain = _mean([_diff(col(R[i + 1], own[i]), col(base, own[i])) for i in range(T)])
    return {"ACC": acc, "BWT": bwt, "FWT": fwt, "forgetting": forgetting, "plasticity": plasticity,
            "mean_gain_over_base": gain}


def loss_metrics(L: list[list[float | None]], own: list[list[int]]) -> dict[str, float | None]:
    """final_loss (mean of the last row), own_loss (each stage's own domains right after it),
    loss_BWT (< 0: held-out loss rose on earlier stages' domains), loss_forgetting (> 0: forgotten)."""
    neg = [[None if x is None else -x for x in row] for row in L]
    m = continual_metrics(neg, own)
    flip = lambda x: None if x is None else -x  # noqa: E731
    return {"final_loss": flip(m["ACC"]), "own_loss": flip(m["plasticity"]), "loss_BWT": m["BWT"],
            "loss_forgetting": m["forgetting"]}
