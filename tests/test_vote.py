"""The support slices' vote on the learned partition's merges (fsct/vote.py, predict.support_vote)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fsct.config import PredictConfig
from fsct.data.pool import read_index
from fsct.errors import FsctError
from fsct.model.panet import PANet
from fsct.partition import cut, merge_sequence
from fsct.vote import (
    Voters,
    agreement,
    load_voter_slices,
    pad_voters,
    prototypes_from_maps,
    support_voters,
    voter_keys,
)
from tests.test_dense import dense_cfg


def two_slice_voters(weight: float = 0.5) -> Voters:
    """Two support slices over 3-d embeddings: one draws structures along axis 0 and 1, the other along 0, 1
    and 2 (ids mean nothing across them)."""
    eye = torch.eye(3, dtype=torch.float64)
    return pad_voters([eye[:2], eye[[2, 1, 0]]], scale=20.0, weight=weight)


def test_agreement_is_how_often_a_support_slice_calls_both_regions_one_structure():
    v = two_slice_voters()
    assert v.protos.shape == (2, 3, 3) and v.valid.tolist() == [[True, True, False], [True, True, True]]
    x = torch.tensor([[1.0, 0.1, 0.0], [3.0, 0.2, 0.1], [0.1, 1.0, 0.0], [0.0, 0.0, 1.0]])
    p = v.probs(x)
    np.testing.assert_allclose(p.sum(-1).numpy(), 1.0)  # a softmax within each slice
    assert (p[:, 0, 2] == 0).all()  # padding never takes a vote
    same = agreement(p[[0]], p[[1]])  # the same structure at another scale: the embedding's norm is not used
    apart = agreement(p[[0]], p[[2]])
    # axis 2: slice 0 has no structure there and cannot choose (0.5 each), slice 1 tells it apart: 0.25
    split = agreement(p[[0]], p[[3]])
    assert same > 0.99 and apart < 0.01
    assert 0.2 < split < 0.3


def test_the_vote_keeps_apart_what_the_support_slices_tell_apart():
    """Two halves with a faint border and near embeddings merge on the border-and-embedding cost; when the
    support slices put a border between their structures, the vote keeps them apart at the same threshold."""
    sp = np.zeros((20, 20), np.int64)
    sp[:, :10], sp[:, 10:] = 1, 2
    prob = np.full((20, 20), 0.1)
    emb = np.zeros((3, 20, 20))
    emb[0] = 1.0
    emb[1, :, :10], emb[1, :, 10:] = 0.3, -0.3  # cosine 0.83 between the halves: embedding distance 0.17
    before = merge_sequence(sp, prob, emb, 0.6)
    assert len(np.unique(cut(sp, before, 0.2))) == 1
    support = torch.tensor([[[0.0, 1.0, 0.0], [0.0, -1.0, 0.0]]], dtype=torch.float64)  # one slice, 2 structures
    voters = pad_voters([support[0]], scale=20.0, weight=0.25)
    after = merge_sequence(sp, prob, emb, 0.6, voters)
    assert after[0, 0] > 0.2 + before[0, 0]  # 0.75 x the old cost + 0.25 x (1 - agree ~ 0)
    assert len(np.unique(cut(sp, after, 0.2))) == 2
    # support slices that see one structure there: the vote agrees, and the halves merge again
    voters = pad_voters([torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64)], 20.0, 0.25)
    assert len(np.unique(cut(sp, merge_sequence(sp, prob, emb, 0.6, voters), 0.2))) == 1
    # weight 0: the vote is off, the order is the shipped one
    np.testing.assert_array_equal(merge_sequence(sp, prob, emb, 0.6, pad_voters([support[0]], 20.0, 0.0)), before)


def test_prototypes_are_each_structures_mean_embedding_above_the_size_floor():
    emb = torch.zeros(1, 2, 8, 8)
    emb[0, 0, :, :4] = 2.0
    emb[0, 1, :, 4:] = 1.0
    masks = torch.zeros(1, 8, 8)
    masks[0, :, :4], masks[0, :, 4:] = 5, 9
    masks[0, 0, 0] = 3  # one cell: under the floor
    (p,) = prototypes_from_maps(emb, masks, min_cells=4)
    np.testing.assert_allclose(p.numpy(), [[1.0, 0.0], [0.0, 1.0]])
    with pytest.raises(FsctError, match="two labelled structures"):
        pad_voters(prototypes_from_maps(emb, masks, min_cells=100), 20.0, 0.25)


def test_voters_come_from_the_support_splits_labelled_slices(shards: Path):
    index = read_index(shards)
    train = sorted(index["splits"]["train"]["samples"])
    keys = voter_keys(shards, "train", 3)
    assert len(keys) == 3 and keys[0] == train[0] and keys[-1] == train[-1]  # spread over the split
    assert voter_keys(shards, "train", 1000) == train
    images, masks = load_voter_slices(shards, "train", 3)
    assert images.shape == masks.shape == (3, 512, 512) and images.dtype == np.uint8
    model = PANet(dense_cfg(encoder="resnet18")).eval()
    voters = support_voters(model, images, masks, PredictConfig(support_vote=0.25), image_size=64)
    assert voters.protos.shape[0] == 3 and voters.protos.shape[2] == 16 and voters.weight == 0.25
    counts = voters.valid.sum(1)
    assert (counts >= 2).all()
    norms = voters.protos.norm(dim=2)[voters.valid]
    np.testing.assert_allclose(norms.numpy(), 1.0, atol=1e-9)
    with pytest.raises(FsctError, match=r"split 'test' has no slice with two labelled structures"):
        voter_keys(shards, "test", 3)
