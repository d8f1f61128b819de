import torch

from stagewise.optim import lr_lambda
from stagewise.rl.grpo import loss_mask

CMASK = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0], [1, 1, 1]])
TRUNC = torch.tensor([False, True, False, True])
# global rewards, G = 2: group 0 = rows 0-1 (varies), group 1 = rows 2-3 (flat), group 2 (other process)
REWARDS = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.0, 1.0])


def test_no_masking_keeps_completion_mask():
    m = loss_mask(CMASK, TRUNC, REWARDS, 2, 0, 4, drop_zero_variance=False, mask_truncated=False)
    assert m.tolist() == CMASK.float().tolist()


def test_truncated_rows_dropped():
    m = loss_mask(CMASK, TRUNC, REWARDS, 2, 0, 4, drop_zero_variance=False, mask_truncated=True)
    assert m.tolist() == [[1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]]


def test_zero_variance_groups_dropped_using_global_rewards():
    m = loss_mask(CMASK, TRUNC, REWARDS, 2, 0, 4, drop_zero_variance=True, mask_truncated=False)
    assert m.tolist() == [[1, 1, 0], [1, 1, 1], [0, 0, 0], [0, 0, 0]]
    # the rows of the second process (global rows 2..5) are judged on the same global rewards
    m = loss_mask(CMASK, TRUNC, REWARDS, 2, 2, 6, drop_zero_variance=True, mask_truncated=True)
    assert m.tolist() == [[0, 0, 0], [0, 0, 0], [1, 0, 0], [0, 0, 0]]


def test_lr_schedule_hand_computed():
    f = lr_lambda("cosine", warmup=2, total=6, min_ratio=0.1)
    assert [round(f(s), 4) for s in range(6)] == [0.5, 1.0, 1.0, round(0.1 + 0.9 * 0.5 * (1 + 0.7071067811865476), 4),
                                                  0.55, round(0.1 + 0.9 * 0.5 * (1 - 0.7071067811865476), 4)]
    assert lr_lambda("constant", 0, 10, 0.1)(7) == 1.0
    assert lr_lambda("linear", 0, 10, 0.0)(5) == 0.5
