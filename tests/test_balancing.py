"""The load-balancing experiment behind notebook 04: routing collapses without balancing and stays
balanced with it (the trend of Shazeer et al. 2017, Table 6), with fixed seeds."""
import pytest

from moe_lab.balancing import BalanceConfig, BalanceExperiment, train_router

STEPS = 150


@pytest.mark.parametrize("seed", [0, 1])
def test_switch_aux_loss_prevents_collapse(seed):
    free = train_router(BalanceConfig(seed=seed), STEPS)
    balanced = train_router(BalanceConfig(alpha=0.1, seed=seed), STEPS)
    assert free["max_over_mean"] > 2.5, free  # collapse: one expert takes several times its share
    assert balanced["max_over_mean"] < 1.5, balanced
    assert sum(free["load"]) == sum(balanced["load"]) == 2048


def test_shazeer_losses_prevent_collapse_of_noisy_router():
    free = train_router(BalanceConfig(router="noisy_topk"), STEPS)
    balanced = train_router(BalanceConfig(router="noisy_topk", w_importance=0.1, w_load=0.1), STEPS)
    assert free["max_over_mean"] > 2.0, free
    assert balanced["max_over_mean"] < 1.4, balanced


def test_history_and_determinism():
    a, b = BalanceExperiment(BalanceConfig(tokens=64)), BalanceExperiment(BalanceConfig(tokens=64))
    a.step(3)
    b.step(3)
    assert a.history.task_loss == b.history.task_loss and len(a.history.load) == 3
    assert all(sum(row) == 64 for row in a.history.load)
    assert len(a.history.aux_loss) == len(a.history.max_vio) == 3


def test_w_load_needs_noisy_router():
    with pytest.raises(ValueError, match="noisy_topk"):
        BalanceExperiment(BalanceConfig(w_load=0.1))
