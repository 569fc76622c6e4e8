"""The dense PANet (decoder: unet), its encoders and pretrained weights, and the learned partition."""

from __future__ import annotations

import json
import sys
import types
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fsct.body_scale import median_body_size
from fsct.config import AugmentConfig, ModelConfig, PredictConfig, load_config
from fsct.data.augment import _sharpen, augment_batch
from fsct.data.pool import load_split
from fsct.errors import FsctError
from fsct.model.backbones import EfficientNetLite0, build_encoder
from fsct.model.panet import PANet, boundary_target
from fsct.partition import (
    FLOOD_LEVELS,
    basins,
    cut,
    flood,
    flood_torch,
    hierarchy_partition,
    learned_hierarchies,
    learned_partition,
    merge_sequence,
)
from fsct.submission import read_submission
from fsct.threshold import GRID, region_floor, threshold_scores
from tests.conftest import REPO, fsct


def dense_cfg(**kw) -> ModelConfig:
    return ModelConfig(**{"decoder": "unet", "feature_dim": 16, "decoder_dim": 16, **kw})


def episode(e: int = 2, s: int = 1, q: int = 1, size: int = 64, n_way: int = 2):
    g = torch.Generator().manual_seed(0)
    raw = torch.zeros(e, s + q, size, size, dtype=torch.long)
    raw[..., 8:30, 8:40] = 7
    raw[..., 34:60, 10:50] = 3
    lbl = torch.where(raw == 7, 1, torch.where(raw == 3, 2, 0))
    img = torch.rand(e, s + q, 1, size, size, generator=g) * 2 - 1
    return img[:, :s], lbl[:, :s], img[:, s:], lbl[:, s:], n_way, raw


@pytest.mark.parametrize("encoder", ["resnet18", "efficientnet_lite0"])
def test_dense_shapes_and_every_parameter_learns(encoder: str):
    model = PANet(dense_cfg(encoder=encoder))
    x = torch.randn(3, 1, 64, 64)
    feats, bnd = model.dense(x)
    assert feats.shape == (3, 16, 32, 32) and bnd.shape == (3, 32, 32)  # stride 2
    s_img, s_lbl, q_img, q_lbl, n_way, raw = episode()
    logits = model(s_img, s_lbl, q_img, n_way)
    assert logits.shape == (2, 1, 3, 64, 64)
    for r in (raw, None):  # superpixel episodes pass no label maps: the head must still be in the graph
        model.zero_grad()
        terms = model(s_img, s_lbl, q_img, n_way, q_lbl=q_lbl, raw=r)
        terms["loss"].backward()
        assert (terms["boundary"].item() > 0) == (r is not None)
        missing = [n for n, p in model.named_parameters() if p.grad is None]
        assert not missing, missing  # DDP would fail on parameters without gradients


@pytest.mark.parametrize("mult", [0.0, 0.1])
def test_encoder_lr_mult_scales_the_encoders_steps_only(mult: float):
    from accelerate import Accelerator

    from fsct.config import Config
    from fsct.data.episodes import Batch
    from fsct.engine import make_optimizer, train_step

    cfg = Config(model=dense_cfg(encoder="efficientnet_lite0"))
    cfg.optim.encoder_lr_mult, cfg.optim.warmup_steps, cfg.optim.grad_clip = mult, 0, 0.0
    model = PANet(cfg.model)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    assert [g["lr_mult"] for g in opt.param_groups] == [mult, 1.0]
    s_img, s_lbl, q_img, q_lbl, n_way, raw = episode()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_step(Accelerator(cpu=True), model, opt, lambda: Batch(s_img, s_lbl, q_img, q_lbl, n_way, raw), 10, cfg)
    moved = {n: (p.detach() - before[n]).abs().max().item() for n, p in model.named_parameters()}
    enc = [moved[n] for n in moved if n.startswith("encoder.")]
    rest = [moved[n] for n in moved if not n.startswith("encoder.")]
    assert max(rest) > 0
    if mult == 0:
        assert max(enc) == 0  # a frozen encoder: no step, no weight decay
    else:  # Adam's first step moves each weight by about its lr: the encoder's a tenth of the rest's
        assert 0 < max(enc) < 0.2 * max(rest)


def test_decoder_none_is_todays_panet_and_seed_refuses_a_decoder():
    assert not hasattr(PANet(ModelConfig(feature_dim=16)), "decoder")
    assert PANet(ModelConfig(feature_dim=16)).features(torch.randn(1, 1, 64, 64)).shape == (1, 16, 8, 8)
    with pytest.raises(FsctError, match="decoder=none"):
        PANet(dense_cfg(variant="seed"))
    with pytest.raises(FsctError, match="decoder=unet"):
        PANet(ModelConfig(encoder="efficientnet_lite0"))


def test_boundary_target_marks_borders_and_ignores_pure_background():
    raw = torch.zeros(1, 8, 8, dtype=torch.long)
    raw[0, :, :4] = 5
    raw[0, :, 4:6] = 9  # columns 6,7 stay background
    border, seen = boundary_target(raw, (8, 8))
    np.testing.assert_array_equal(border[0, 0].numpy(), [0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(seen[0, 0].numpy(), [1, 1, 1, 1, 1, 1, 1, 0])  # column 7 sees only 0
    half_border, half_seen = boundary_target(raw, (4, 4))
    np.testing.assert_array_equal(half_border[0, 0].numpy(), [0, 1, 1, 1])


def test_basins_are_the_regional_minima_of_the_quantised_map():
    """Against scikit-image's own regional minima (plateaus whose every neighbour is higher)."""
    from skimage.morphology import local_minima

    g = torch.Generator().manual_seed(1)
    prob = torch.nn.functional.avg_pool2d(torch.rand((2, 1, 48, 48), generator=g), 7, 1, 3)[:, 0]
    seeds = basins(prob).numpy()
    for q, s in zip(torch.floor(prob * FLOOD_LEVELS).numpy(), seeds, strict=True):
        np.testing.assert_array_equal(s > 0, local_minima(q, connectivity=2, allow_borders=True))
        assert s.max() > 1  # several basins, each labelled


def test_cpu_and_torch_floods_label_every_cell_from_its_seed_alike():
    """The torch flood replays scikit-image's priority flood cell for cell, where fronts meet included."""
    g = torch.Generator().manual_seed(2)
    prob = torch.nn.functional.avg_pool2d(torch.rand((3, 1, 48, 48), generator=g), 7, 1, 3)[:, 0]
    x = torch.linspace(0, 1, 48)
    prob[2] = (1 - (2 * x - 1).abs()).expand(48, 48) * 0.95  # two pits, a ridge rising level by level between
    seeds = basins(prob)
    cpu, dev = flood(seeds, prob), flood_torch(seeds, prob)
    for lab in (cpu, dev):
        assert (lab > 0).all()
        assert torch.equal(lab[seeds > 0], seeds[seeds > 0])
        assert set(lab.unique().tolist()) <= set(seeds.unique().tolist()) - {0.0}
    assert seeds[:2].amax((1, 2)).min() >= 5  # many fronts meet
    np.testing.assert_array_equal(dev.numpy(), cpu.numpy())


def test_learned_partition_cuts_along_the_boundary_map_deterministically():
    prob = torch.full((2, 64, 64), 0.05)
    prob[:, 30:33, :] = 0.95  # a horizontal wall
    prob[:, :30, 40:42] = 0.9  # and a vertical one in the upper half
    prob[1, 50:52, 5:7] = 0.0  # an isolated low cell stays part of its surroundings
    cfg = PredictConfig(boundary_threshold=0.5, min_region=64)
    a, b = learned_partition(prob, cfg), learned_partition(prob, cfg)
    assert a.dtype == np.uint8 and a.shape == (2, 512, 512)
    np.testing.assert_array_equal(a, b)
    for part in a:
        assert len(np.unique(part)) == 3  # the thick walls are borders, not regions of their own
        up_left, up_right, low = part[100, 100], part[100, 450], part[400, 100]
        assert len({up_left, up_right, low}) == 3
        assert (part[:200, :300] == up_left).all() and (part[300:] == low).all()
    # past the walls' mean probability everything is one region
    assert len(np.unique(learned_partition(prob, PredictConfig(boundary_threshold=0.97)))) == 1


def test_learned_partition_keeps_a_small_structure_inside_a_large_one():
    """A structure of 8x8 cells (64x64 px at 512) with a clear rim, inside an organ: its own basin at any
    threshold under the rim, merged into the organ only once the threshold passes the rim's mean."""
    prob = torch.full((1, 64, 64), 0.1)
    prob[0, 20:32, 20:32] = 0.8  # the rim
    prob[0, 22:30, 22:30] = 0.2  # the inside, higher than the organ's: no threshold makes it a seed of its own
    for t in (0.3, 0.5, 0.7):
        part = learned_partition(prob, PredictConfig(boundary_threshold=t, min_region=64))[0]
        inside, organ = part[26 * 8, 26 * 8], part[5, 5]
        assert inside != organ and (part[23 * 8:29 * 8, 23 * 8:29 * 8] == inside).all()
    assert len(np.unique(learned_partition(prob, PredictConfig(boundary_threshold=0.9))[0])) == 1
    # min_region (pixels at 512x512) still folds a region smaller than it into its neighbour
    assert len(np.unique(learned_partition(prob, PredictConfig(boundary_threshold=0.5, min_region=200**2))[0])) == 1


def test_learned_partitions_are_nested_as_the_threshold_rises():
    """Each threshold's partition is a prefix of one merge order: a higher threshold only merges regions."""
    g = torch.Generator().manual_seed(0)
    prob = torch.nn.functional.avg_pool2d(torch.rand((1, 1, 64, 64), generator=g), 5, 1, 2)[0]
    (h,) = learned_hierarchies(prob)
    assert (np.diff(h.merges[:, 0]) >= 0).all()
    prev = None
    for t in (0.3, 0.45, 0.5, 0.55, 0.7):
        part = hierarchy_partition(h, t, min_region=1, out_size=256)
        if prev is not None:  # every region of the finer partition lies inside one region of the coarser
            pairs = np.unique(np.stack([prev.ravel(), part.ravel()]), axis=1)
            assert len(np.unique(pairs[0])) == pairs.shape[1]
        prev = part
    assert len(np.unique(hierarchy_partition(h, 2.0, 1, 256))) == 1


def rgb_lite0_state() -> dict[str, torch.Tensor]:
    """A tiny locally written 'ImageNet' file: the Lite0 layout with an RGB stem and a classifier."""
    torch.manual_seed(1)
    enc = EfficientNetLite0(in_channels=3)
    for p in enc.parameters():
        nn.init.normal_(p, std=0.1)
    sd = dict(enc.state_dict())
    sd["_fc.weight"] = torch.zeros(10, 1280)
    return sd


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_pretrained_weights_from_a_local_file(tmp_path: Path, suffix: str):
    sd = rgb_lite0_state()
    path = tmp_path / f"lite0{suffix}"
    if suffix == ".pth":
        torch.save(sd, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    model = PANet(dense_cfg(encoder="efficientnet_lite0", pretrained=str(path)))
    got = model.encoder.state_dict()
    torch.testing.assert_close(got["_conv_stem.weight"], sd["_conv_stem.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(got["_blocks.5._depthwise_conv.weight"], sd["_blocks.5._depthwise_conv.weight"])
    scratch = PANet(dense_cfg(encoder="efficientnet_lite0"))
    assert not torch.equal(scratch.encoder.state_dict()["_blocks.5._depthwise_conv.weight"],
                           sd["_blocks.5._depthwise_conv.weight"])


def test_pretrained_errors_are_one_line(tmp_path: Path):
    with pytest.raises(FsctError, match="not found"):
        build_encoder("efficientnet_lite0", str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.pth"
    torch.save({"_conv_stem.weight": torch.zeros(8, 3, 3, 3)}, bad)
    with pytest.raises(FsctError, match="shape"):
        build_encoder("efficientnet_lite0", str(bad))
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(FsctError, match="cannot read weights"):
        build_encoder("efficientnet_lite0", str(tmp_path / "junk.safetensors"))
    with pytest.raises(FsctError, match="timm/"):
        build_encoder("resnet18", "timm/resnet18.a1_in1k")


class _FeatureInfo:
    def __init__(self, channels: list[int]):
        self._c = channels

    def channels(self) -> list[int]:
        return self._c

    def reduction(self) -> list[int]:
        return [2, 4, 8, 16, 32]


class _TinyFeatures(nn.Module):
    """What timm.create_model(..., features_only=True) returns: a module with feature_info and a list."""

    def __init__(self, in_chans: int):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv2d(in_chans if i == 0 else 4 * i, 4 * (i + 1), 3, 2, 1)
                                    for i in range(5)])
        self.feature_info = _FeatureInfo([4, 8, 12, 16, 20])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for c in self.convs:
            x = c(x)
            out.append(x)
        return out


def test_timm_encoder_through_the_features_only_contract(tmp_path: Path, monkeypatch):
    calls = []

    def create_model(name: str, features_only: bool, in_chans: int, pretrained: bool, **kw):
        calls.append((name, features_only, in_chans, pretrained, kw))
        return _TinyFeatures(in_chans)

    monkeypatch.setitem(sys.modules, "timm", types.SimpleNamespace(create_model=create_model))
    weights = {k: torch.full_like(v, 0.5) for k, v in _TinyFeatures(3).state_dict().items()}
    torch.save(weights, tmp_path / "tiny.pth")
    model = PANet(dense_cfg(encoder="timm/tiny", pretrained=str(tmp_path / "tiny.pth")))
    assert calls[-1][:4] == ("tiny", True, 1, False)
    stem = model.encoder.body.convs[0].weight
    torch.testing.assert_close(stem, torch.full_like(stem, 1.5))  # RGB summed onto the CT channel
    feats, bnd = model.dense(torch.randn(2, 1, 64, 64))
    assert feats.shape == (2, 16, 32, 32) and bnd.shape == (2, 32, 32)
    PANet(dense_cfg(encoder="timm/tiny", pretrained="timm/tiny.in1k"))
    assert calls[-1][3] is True and calls[-1][4] == {"pretrained_cfg_overlay": {"hf_hub_id": "timm/tiny.in1k"}}


def test_real_timm_encoder_when_installed():
    pytest.importorskip("timm")
    model = PANet(dense_cfg(encoder="timm/resnet18"))
    feats, bnd = model.dense(torch.randn(1, 1, 64, 64))
    assert feats.shape == (1, 16, 32, 32) and bnd.shape == (1, 32, 32)


DENSE = ["data.image_size=64", "model.feature_dim=16", "model.decoder_dim=16", "episodes.n_way=2",
         "episodes.k_shot=1", "episodes.n_query=1", "episodes.episodes_per_step=2", "train.max_steps=4",
         "train.val_every=2", "train.val_episodes=2", "train.val_slices=3", "train.save_every=0"]


@pytest.mark.slow
def test_partition_recipe_trains_validates_and_predicts(shards: Path, tmp_path: Path):
    run = tmp_path / "run"
    r = fsct("train", "--config", str(REPO / "configs" / "partition_cpu.yaml"), f"data.shards={shards}",
             f"train.output_dir={run}", *DENSE)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [row for row in rows if "val/ari_fg" in row]
    assert [row["step"] for row in val] == [2, 4]
    assert all(-1 <= row["val/ari_fg"] <= 1 and "val/ari_episode" in row and "train/boundary" not in row
               for row in val)
    assert any("train/boundary" in row for row in rows)
    # the threshold chosen on val travels with the model
    saved = load_config(run / "config.yaml")
    assert val[-1]["val/boundary_threshold"] in GRID
    assert saved.predict.boundary_threshold == val[-1]["val/boundary_threshold"]
    # so does the region floor: the median structure count of a labelled train slice, read back from the shards
    assert saved.predict.min_regions == median_structures(shards, saved.predict.min_region) >= 2
    # and the train slices' median body size, which prediction sets other bodies to (fsct.body_scale)
    assert saved.predict.body_size == pytest.approx(median_body_size(load_split(shards, "train").images))
    assert 0.3 < saved.predict.body_size < 0.95
    subs = []
    for name in ("a.csv", "b.csv"):  # the recipe's own predict settings: the learned partition
        r = fsct("predict", "--checkpoint", str(run), "--support", str(shards), "--images", str(shards),
                 "--out", str(tmp_path / name))
        assert r.returncode == 0, r.stderr[-3000:]
        subs.append(read_submission(tmp_path / name)[1])
    assert subs[0].shape == (4, 512, 512)
    np.testing.assert_array_equal(subs[0], subs[1])
    assert all(len(np.unique(m)) >= 2 for m in subs[0])
    # the GPU's path (batched torch ops), forced on the CPU: the same submission
    r = fsct("predict", "--checkpoint", str(run), "--support", str(shards), "--images", str(shards),
             "--out", str(tmp_path / "torch.csv"), "predict.partition_ops=torch")
    assert r.returncode == 0, r.stderr[-3000:]
    np.testing.assert_array_equal(read_submission(tmp_path / "torch.csv")[1], subs[0])


def test_validation_chooses_the_threshold_on_the_maps_predict_cuts():
    from fsct.config import Config
    from fsct.data.pool import Pool
    from fsct.predict import dense_maps
    from fsct.train import ValSet, partition_scores

    masks = np.zeros((3, 64, 64), np.uint8)
    masks[:, 4:30, 4:60], masks[:, 34:60, 4:60] = 1, 2
    noise = np.random.default_rng(0).random((3, 64, 64)) * 60
    images = (masks * 80 + noise).astype(np.uint8)
    val = ValSet(None, None, Pool(["a", "b", "c"], images, masks, None, [{}, {}, {}]))

    class Edges(nn.Module):  # a dense model whose boundary map is the image's one-sided gradient
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.tensor(10.0))

        def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            x = torch.nn.functional.avg_pool2d(x, 2)
            edge = (x - x.roll(1, -1)).abs() + (x - x.roll(1, -2)).abs()  # not mirror-symmetric
            return torch.cat([x, x.roll(3, -1)], 1), (self.gain * edge - 3).squeeze(1)

    model = Edges()
    cfg = Config()
    cfg.data.image_size = 64
    cfg.predict.partition_split, cfg.predict.embedding_weight = "learned", 0.6
    expected = {}
    for tta in (False, True):
        cfg.predict.tta_flip = tta
        prob, emb = dense_maps(model, torch.from_numpy(images), tta, 64)
        expected[tta] = threshold_scores(prob, images, masks, cfg.predict, GRID, emb).sum(1)
        got = partition_scores(model, val, cfg, rank=0, world=1).numpy()
        np.testing.assert_allclose(got, [*expected[tta], 3])
    # flip TTA changes the scores, so a threshold chosen on plain maps may not fit the TTA maps
    assert not np.allclose(expected[False], expected[True])


def test_pooled_border_merge_glues_superpixels_the_model_sees_no_border_between():
    sp = np.zeros((40, 40), np.int64)
    sp[:20, :20], sp[:20, 20:], sp[20:, :20], sp[20:, 20:] = 1, 2, 3, 4  # four "superpixels"
    prob = np.full((40, 40), 0.1)
    prob[19:21, :] = 0.9  # a real border between the top and the bottom half
    merged = cut(sp, merge_sequence(sp, prob), 0.5)
    assert merged[0, 0] == merged[0, 39] and merged[39, 0] == merged[39, 39]
    assert merged[0, 0] != merged[39, 0]
    # a strong border along most of a pair, weak at one spot: pooled, the pair stays apart
    prob = np.full((40, 40), 0.1)
    prob[:, 19:21] = 0.9
    prob[19:21, :] = 0.9
    prob[30:32, 19:21] = 0.1
    merged = cut(sp, merge_sequence(sp, prob), 0.5)
    assert len(np.unique(merged)) == 4
    np.testing.assert_array_equal(cut(sp, merge_sequence(sp, prob), 0.95), np.full_like(sp, merged[0, 0]))


def test_embedding_term_keeps_apart_what_differs_and_joins_what_matches():
    sp = np.zeros((40, 40), np.int64)
    sp[:20, :20], sp[:20, 20:], sp[20:, :20], sp[20:, 20:] = 1, 2, 3, 4
    prob = np.full((40, 40), 0.3)  # the same faint border everywhere: the map alone cannot tell the pairs apart
    emb = np.zeros((2, 40, 40))
    emb[0, :20] = 1.0  # the top half is one structure, the bottom half another
    emb[1, 20:] = 1.0
    assert len(np.unique(cut(sp, merge_sequence(sp, prob), 0.5))) == 1  # border alone: all merged
    # cost = 0.5 * 0.3 + 0.5 * (1 - cos): 0.15 within a half, 0.65 across
    merges = merge_sequence(sp, prob, emb, 0.5)
    np.testing.assert_allclose(merges[:, 0], [0.15, 0.15, 0.65])
    merged = cut(sp, merges, 0.4)
    assert merged[0, 0] == merged[0, 39] and merged[39, 0] == merged[39, 39] and merged[0, 0] != merged[39, 0]
    np.testing.assert_array_equal(merge_sequence(sp, prob, emb, 0.0), merge_sequence(sp, prob))


def test_threshold_scores_find_the_threshold_that_separates():
    truth = np.zeros((1, 64, 64), np.uint8)
    truth[0, :30], truth[0, 34:] = 1, 2
    prob = torch.full((1, 32, 32), 0.3)
    prob[:, :, 15:17] = 0.4  # a weak ridge inside each half: only thresholds over 0.4 heal it
    prob[0, 15:17] = 0.6  # the border sits at 0.6: thresholds under 0.6 keep the halves apart
    scores = threshold_scores(prob, np.zeros((1, 64, 64), np.uint8), truth,
                              PredictConfig(partition_split="learned", min_region=1), (0.2, 0.5, 0.7))
    assert scores.shape == (3, 1)
    assert scores[1, 0] == pytest.approx(1.0) and scores[2, 0] == pytest.approx(0.0)
    assert scores[0, 0] < 1.0  # under the weak ridge's 0.4 each half stays cut in two


def test_region_floor_steps_the_threshold_down_until_a_slice_has_enough_regions():
    """Quadrants apart by a strong border (top | bottom) and weaker ones (left | right): a threshold over every
    border gives one region; the floor falls back down the grid to the highest threshold with enough."""
    prob = torch.full((1, 64, 64), 0.05)
    prob[0, 31:33, :] = 0.55
    prob[0, :, 31:33] = 0.3
    cfg = PredictConfig(partition_split="learned", boundary_threshold=0.7, min_region=64)
    regions = {}
    for floor in (0, 1, 2, 3, 4, 9):
        part = learned_partition(prob, replace(cfg, min_regions=floor))[0]
        regions[floor] = len(np.unique(part))
        torch_part = learned_partition(prob, replace(cfg, min_regions=floor, partition_ops="torch"))[0]
        np.testing.assert_array_equal(torch_part, part)
    # no cut of these borders has 3 regions, so floor 3 falls to the quadrants; none has 9, so floor 9 ends at
    # the grid's lowest threshold: the quadrants too
    assert regions == {0: 1, 1: 1, 2: 2, 3: 4, 4: 4, 9: 4}
    top = learned_partition(prob, replace(cfg, min_regions=2))[0]
    assert top[0, 0] == top[0, 511] != top[511, 0] == top[511, 511]
    # the threshold scores of validation see the same fallback, so val chooses among the floored partitions
    truth = np.zeros((1, 64, 64), np.uint8)
    truth[0, :32], truth[0, 32:] = 1, 2
    scores = threshold_scores(prob, np.zeros((1, 64, 64), np.uint8), truth, replace(cfg, min_regions=2), (0.2, 0.7))
    assert scores[0, 0] < scores[1, 0] == pytest.approx(1.0)
    assert threshold_scores(prob, np.zeros((1, 64, 64), np.uint8), truth, cfg, (0.7,))[0, 0] == pytest.approx(0.0)


def median_structures(shards: Path, min_region: int) -> int:
    """The median number of labels of >= min_region pixels of a train slice, from the masks in the shards."""
    masks = load_split(shards, "train").masks
    return int(np.median([sum(n >= min_region for n in np.bincount(m.ravel())[1:]) for m in masks]))


def test_region_floor_is_the_median_structure_count_of_the_train_split(shards: Path):
    index = json.loads((shards / "index.json").read_text())
    for min_region in (1, 2000):
        assert region_floor(index, "train", min_region) == median_structures(shards, min_region)
    assert region_floor(index, "train", 1) > region_floor(index, "train", 2000)
    assert region_floor(index, "no-such-split", 64) == 0


def test_sharpness_augmentation():
    img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_sharpen(img, torch.zeros(3)), img)
    flat = torch.full((1, 16, 16), 0.4)
    torch.testing.assert_close(_sharpen(flat, torch.tensor([0.7])), flat)  # no edges, nothing to sharpen
    blurred = _sharpen(img, -torch.ones(3))
    assert blurred.std() < img.std()  # -1 is the gaussian blur itself
    assert _sharpen(img, torch.ones(3)).std() > img.std()
    lbl = torch.zeros(3, 32, 32, dtype=torch.long)
    cfg = AugmentConfig(sharpness=0.5)
    a = augment_batch(img, lbl, cfg, torch.Generator().manual_seed(1))[0]
    b = augment_batch(img, lbl, cfg, torch.Generator().manual_seed(1))[0]
    torch.testing.assert_close(a, b)
    plain = augment_batch(img, lbl, AugmentConfig(), torch.Generator().manual_seed(1))[0]
    assert not torch.equal(a, plain)


def test_keep_freed_memory_sets_glibc_thresholds():
    from fsct.malloc import keep_freed_memory

    assert keep_freed_memory() is sys.platform.startswith("linux")
