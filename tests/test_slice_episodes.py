"""Slice and superpixel episodes: valid whatever the ids (renumbered at random on every slice), support
and query from one slice, every way present; the slice+superpixel mix trains end to end."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from fsct.config import AugmentConfig, EpisodeConfig, load_config
from fsct.data.challenge import read_image, read_labels
from fsct.data.episodes import EpisodeSampler, PoolTensors, make_batch, step_generator
from fsct.data.pool import Pool
from fsct.data.shards import class_counts
from fsct.data.superpixels import superpixels

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
SIZE = 512


@pytest.fixture(scope="module")
def pools(realct_dir: Path) -> tuple[Pool, Pool]:
    """Six labelled realct-mini slices with ids renumbered at random per slice, and three unlabelled ones
    with superpixels."""
    cols, masks = read_labels(realct_dir / "Y_train.csv.gz")
    rng = np.random.default_rng(7)
    keys = [0, 1, 4, 5, 6, 7]
    imgs, lbls = [], []
    for i in keys:
        m = masks[cols.index(f"{i}.png")]
        present = np.unique(m)[1:]
        lut = np.zeros(256, np.uint8)
        lut[present] = rng.choice(np.arange(1, 256), len(present), replace=False)
        lbls.append(lut[m])
        imgs.append(read_image(realct_dir / "X_train" / "images" / f"{i}.png"))
    labelled = Pool([str(k) for k in keys], np.stack(imgs), np.stack(lbls), None, [class_counts(m) for m in lbls])
    u_keys = [8, 9]
    u_imgs = np.stack([read_image(realct_dir / "X_train" / "images" / f"{i}.png") for i in u_keys])
    unlabelled = Pool([str(k) for k in u_keys], u_imgs, None, np.stack([superpixels(x) for x in u_imgs]),
                      [{} for _ in u_keys])
    return labelled, unlabelled


def _check(sampler: EpisodeSampler, pool: Pool, sp_pool: Pool, mode: str, n_way: int, steps: int) -> None:
    tensors, sp = PoolTensors.from_pool(pool), PoolTensors.from_pool(sp_pool)
    for step in range(steps):
        ep = sampler.episode(step)
        assert ep.mode == mode
        assert len(set(ep.support.tolist()) | set(ep.query.tolist())) == 1  # one slice, two views
        maps = (sp_pool.superpixels if mode == "superpixel" else pool.masks)[ep.support[0]]
        assert len(set(ep.ways.tolist())) == n_way
        assert all((maps == w).sum() >= sampler.cfg.min_pixels for w in ep.ways)
        plain = make_batch([ep], tensors, n_way, None, None, sp)
        for lbl in (plain.s_lbl[0], plain.q_lbl[0]):
            assert 0 <= int(lbl.min()) and int(lbl.max()) <= n_way
            for view in lbl:  # without augmentation every way is in every view, at its own pixels
                assert set(torch.unique(view).tolist()) == set(range(n_way + 1))
                for i, w in enumerate(ep.ways, start=1):
                    assert torch.equal(view == i, torch.from_numpy(maps == w))
        aug = make_batch([ep], tensors, n_way, AugmentConfig(), step_generator(0, 0, step, "cpu"), sp)
        assert aug.s_img.shape == (1, sampler.cfg.k_shot, 1, SIZE, SIZE)
        assert not torch.equal(aug.s_img[0, 0], aug.q_img[0, 0])  # different random views
        for lbl in (aug.s_lbl, aug.q_lbl):
            assert 0 <= int(lbl.min()) and int(lbl.max()) <= n_way


def test_slice_episodes_with_renumbered_ids(pools):
    pool, sp_pool = pools
    cfg = EpisodeConfig(mode="slice", n_way=4, k_shot=1, n_query=1)
    _check(EpisodeSampler(pool, cfg, seed=3), pool, sp_pool, "slice", 4, steps=6)


def test_superpixel_episodes(pools):
    pool, sp_pool = pools
    cfg = EpisodeConfig(mode="superpixel", n_way=3, k_shot=1, n_query=1)
    _check(EpisodeSampler(pool, cfg, seed=3, superpixel_pool=sp_pool), pool, sp_pool, "superpixel", 3, steps=6)


def test_mix_draws_both_modes_deterministically(pools):
    pool, sp_pool = pools
    cfg = EpisodeConfig(mix={"slice": 0.5, "superpixel": 0.5}, n_way=3, k_shot=1, n_query=1)
    a = EpisodeSampler(pool, cfg, seed=5, superpixel_pool=sp_pool)
    b = EpisodeSampler(pool, cfg, seed=5, superpixel_pool=sp_pool)
    modes = [a.mode_at(s) for s in range(40)]
    assert set(modes) == {"slice", "superpixel"}
    for s in (0, 17, 39):
        ea, eb = a.episode(s), b.episode(s)
        assert ea.mode == eb.mode and np.array_equal(ea.ways, eb.ways) and np.array_equal(ea.support, eb.support)


@pytest.mark.slow
def test_mix_trains_end_to_end(pools, tmp_path: Path):
    """`fsct shard --superpixels` then a few training steps of the slice+superpixel mix, in process, with
    validation on true masks (val/ari_fg)."""
    from PIL import Image

    from fsct.data.challenge import write_labels
    from fsct.data.shards import shard_dataset
    from fsct.train import train

    pool, sp_pool = pools
    src = tmp_path / "X_train" / "images"
    src.mkdir(parents=True)
    names = [f"{k}.png" for k in pool.keys + sp_pool.keys]
    for name, img in zip(names, np.concatenate([pool.images, sp_pool.images]), strict=True):
        Image.fromarray(img).save(src / name)
    empty = np.zeros((len(sp_pool), SIZE, SIZE), np.uint8)
    write_labels(tmp_path / "Y_train.csv", np.concatenate([pool.masks, empty]), names)
    shards = tmp_path / "shards"
    shard_dataset(src, tmp_path / "Y_train.csv", shards, val_fraction=0.34, superpixels=True, workers=1,
                  progress=False)
    cfg = load_config(None, [f"data.shards={shards}", f"train.output_dir={tmp_path / 'run'}", "train.max_steps=3",
                             "data.image_size=64", "model.feature_dim=16", "episodes.n_way=2", "episodes.k_shot=1",
                             "episodes.n_query=1", "train.val_every=3", "train.val_episodes=2", "train.save_every=0",
                             "train.best_metric=val/ari_fg", "episodes.mix={slice: 0.5, superpixel: 0.5}"])
    state = train(cfg)
    assert state.step == 3
    assert (tmp_path / "run" / "model.safetensors").is_file()
    assert -1.0 <= state.best <= 1.0 and state.best_step == 3  # val/ari_fg computed on validation queries
