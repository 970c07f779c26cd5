import torch
import torch.nn as nn

from dfkd.synth.bn_stats import BNStatsLoss


def test_bn_loss_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2))
    bn1, bn2 = model[1], model[4]
    for bn in (bn1, bn2):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    model.eval()
    x = torch.randn(4, 1, 6, 6)
    with BNStatsLoss(model, first_layer_weight=10.0) as hook:
        model(x)
        got = hook.loss()
    a1 = model[0](x)
    a2 = model[3](model[2](bn1(a1)))

    def term(a, bn):
        mean = a.mean(dim=(0, 2, 3))
        var = ((a - mean.view(1, -1, 1, 1)) ** 2).mean(dim=(0, 2, 3))  # biased
        return ((mean - bn.running_mean) ** 2).sum().sqrt() + ((var - bn.running_var) ** 2).sum().sqrt()

    expected = 10.0 * term(a1, bn1) + term(a2, bn2)
    assert torch.allclose(got, expected, atol=1e-5)
    assert not bn1._forward_hooks  # hooks removed on exit


def test_bn_loss_needs_a_forward_and_bn_layers():
    import pytest

    from dfkd.common.errors import UserError

    with pytest.raises(UserError, match="no BatchNorm layers.*--method noise"):
        BNStatsLoss(nn.Linear(2, 2))
    hook = BNStatsLoss(nn.Sequential(nn.BatchNorm1d(2)))
    with pytest.raises(RuntimeError, match="before a forward"):
        hook.loss()
