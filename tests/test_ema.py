"""The weight average (fsct/ema.py, train.ema_decay)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from fsct.checkpoint import load_model, save_model
from fsct.config import Config
from fsct.ema import FILE, WeightAverage
from fsct.model.panet import PANet
from tests.test_dense import dense_cfg


def test_the_average_follows_the_trained_weights_with_its_decay():
    trained = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), trained, decay=0.9)
    w0 = trained[0].weight.detach().clone()
    assert torch.equal(avg.model[0].weight, w0) and not avg.model[0].weight.requires_grad
    with torch.no_grad():
        trained[0].weight.add_(1.0)
        trained[1].num_batches_tracked.fill_(7)
    avg.update(trained)  # the first update keeps only (1 + 1) / (10 + 1) of the old weights
    torch.testing.assert_close(avg.model[0].weight, w0 + 9 / 11)
    assert int(avg.model[1].num_batches_tracked) == 7  # counters are copied, not averaged
    for _ in range(200):
        avg.update(trained)
    torch.testing.assert_close(avg.model[0].weight, w0 + 1.0)  # decay 0.9: the old weights are gone


def test_a_checkpoint_folder_carries_the_average_and_its_count(tmp_path: Path):
    trained = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    avg = WeightAverage(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), trained, decay=0.9)
    with torch.no_grad():
        trained[0].weight.add_(1.0)
    for _ in range(3):
        avg.update(trained)
    avg.save(tmp_path)
    back = WeightAverage(nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2)), nn.Sequential(
        nn.Linear(2, 2), nn.BatchNorm1d(2)), decay=0.9)
    assert back.load(tmp_path)
    assert back.updates == 3 and torch.equal(back.model[0].weight, avg.model[0].weight)
    assert not back.load(tmp_path / "empty")  # a folder without one: the caller starts a new average


def test_a_checkpoints_average_loads_as_a_model(tmp_path: Path):
    cfg = Config(model=dense_cfg(encoder="resnet18"))
    trained, fresh = PANet(cfg.model), PANet(cfg.model)
    avg = WeightAverage(fresh, trained, decay=0.99)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(1.0)
    avg.update(trained)
    save_model(trained, cfg, tmp_path)  # model.safetensors and config.yaml beside the average's file
    avg.save(tmp_path)
    model, _ = load_model(tmp_path / FILE)
    want = avg.model.state_dict()
    for k, v in model.state_dict().items():
        assert torch.equal(v, want[k]), k
    assert not torch.equal(model.state_dict()["encoder.conv1.weight"], trained.state_dict()["encoder.conv1.weight"])
