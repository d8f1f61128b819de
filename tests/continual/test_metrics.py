import pytest

from stagewise.continual.metrics import continual_metrics

# rows: base, after stage 1 (domain 0), after stage 2 (domain 1), after stage 3 (domain 2)
R = [[0.2, 0.1, 0.3],
     [0.6, 0.2, 0.3],
     [0.4, 0.7, 0.5],
     [0.3, 0.6, 0.9]]
OWN = [[0], [1], [2]]


def test_gem_and_chaudhry_hand_computed():
    m = continual_metrics(R, OWN)
    assert m["ACC"] == pytest.approx((0.3 + 0.6 + 0.9) / 3)
    # BWT = mean(R[3,0]-R[1,0], R[3,1]-R[2,1]) = mean(-0.3, -0.1)
    assert m["BWT"] == pytest.approx(-0.2)
    # FWT = mean(R[1,1]-b1, R[2,2]-b2) = mean(0.2-0.1, 0.5-0.3)
    assert m["FWT"] == pytest.approx(0.15)
    # forgetting: domain 0: max(0.6, 0.4) - 0.3 = 0.3; domain 1: max(0.2, 0.7) - 0.6 = 0.1
    assert m["forgetting"] == pytest.approx(0.2)
    assert m["plasticity"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert m["mean_gain_over_base"] == pytest.approx(((0.6 - 0.2) + (0.7 - 0.1) + (0.9 - 0.3)) / 3)


def test_multi_domain_stage_uses_mean_of_its_columns():
    m = continual_metrics([[0.0, 0.0], [0.4, 0.8]], [[0, 1]])
    assert m["plasticity"] == pytest.approx(0.6) and m["ACC"] == pytest.approx(0.6)
    assert m["BWT"] is None and m["FWT"] is None  # undefined with one stage


def test_rows_must_match_stages():
    with pytest.raises(ValueError):
        continual_metrics(R[:3], OWN)
