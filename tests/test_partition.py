"""Partition inference: unexplained foreground is split into regions with ids of their own."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from fsct.config import PredictConfig
from fsct.metrics import official_score_slice
from fsct.partition import components, merge_small, partition_slice

os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)

KNOWN_ID = 7  # the one support class the prototypes know


def _scene() -> tuple[np.ndarray, np.ndarray, torch.Tensor, np.ndarray]:
    """A body (disc) with a recognised organ (id 7) and two disjoint bright blobs no prototype knows."""
    yy, xx = np.mgrid[:512, :512]
    body = (yy - 256) ** 2 + (xx - 256) ** 2 < 200 ** 2
    organ = (yy - 200) ** 2 + (xx - 180) ** 2 < 50 ** 2
    blob1 = (yy - 330) ** 2 + (xx - 300) ** 2 < 30 ** 2
    blob2 = (yy - 180) ** 2 + (xx - 340) ** 2 < 25 ** 2
    image = np.where(body, 110, 0).astype(np.uint8)
    image[organ] = 140
    image[blob1 | blob2] = 200
    labels = np.where(organ, KNOWN_ID, 0).astype(np.uint8)  # argmax says background on the blobs
    logits = torch.zeros(3, 512, 512)  # bg, class 7, another support class
    logits[0][torch.from_numpy(body & ~organ)] = 10.0  # confident background
    logits[1][torch.from_numpy(organ)] = 10.0  # confident organ
    unseen = torch.from_numpy(blob1 | blob2)
    logits[:, unseen] = 1.0  # no prototype wins: probability 1/3 each
    logits[0, unseen] = 1.2  # background edges out the others: argmax 0, still unexplained
    truth = np.zeros((512, 512), np.uint8)
    truth[organ], truth[blob1], truth[blob2] = 3, 1, 2
    return image, labels, logits, truth


@pytest.mark.parametrize("split", ["group", "superpixels", "components"])
def test_disjoint_unseen_blobs_get_separate_new_ids(split):
    image, labels, logits, truth = _scene()
    cfg = PredictConfig(mode="partition", unexplained_threshold=0.5, min_region=64, partition_split=split)
    out = partition_slice(labels, logits, torch.zeros(8, 64, 64), image, np.array([KNOWN_ID, 9]), cfg)
    assert out.shape == (512, 512) and out.dtype == np.uint8
    a, b = out[330, 300], out[180, 340]
    assert a != 0 and b != 0 and a != b  # two unseen structures, two ids
    assert a not in np.unique(labels) and b not in np.unique(labels)  # never an id of the prediction
    assert out[200, 180] == KNOWN_ID  # the recognised organ keeps its class id
    if split != "group":  # group cuts the background into superpixels too (harmless for the metric)
        assert out[256, 100] == 0  # confident background stays background
    for blob in (truth == 1, truth == 2):
        # each blob is essentially one region (superpixels may peel off a partial-volume rim)
        assert np.bincount(out[blob]).max() > 0.9 * blob.sum()
    assert official_score_slice(truth, out) > 0.8
    # Class-mode argmax puts both blobs in background: one cluster, a worse official score.
    assert official_score_slice(truth, labels) < 0.9


def test_recognised_class_in_two_blobs_becomes_two_regions():
    image, labels, logits, truth = _scene()
    labels = labels.copy()
    labels[380:420, 150:200] = KNOWN_ID  # a second, disjoint blob of class 7
    logits[:, 380:420, 150:200] = 0.0
    logits[1, 380:420, 150:200] = 10.0
    cfg = PredictConfig(mode="partition", partition_split="components")
    out = partition_slice(labels, logits, torch.zeros(8, 64, 64), image, np.array([KNOWN_ID, 9]), cfg)
    assert out[200, 180] == KNOWN_ID  # the larger blob keeps the id
    assert out[400, 175] not in (0, KNOWN_ID)


def test_small_fragments_are_merged_into_their_neighbour():
    regions = np.zeros((64, 64), np.int32)
    regions[:, :32], regions[:, 32:] = 1, 2
    regions[10:13, 10:13] = 3  # a 9-pixel speck inside region 1
    regions[40:44, 30:34] = 4  # a speck on the border, mostly inside region 2
    regions[40:44, 30:32] = 4
    out = merge_small(regions, min_size=20)
    assert set(np.unique(out)) == {1, 2}
    assert out[11, 11] == 1


def test_components_split_equal_values_by_connectivity():
    m = np.zeros((20, 20), np.int64)
    m[2:5, 2:5] = 9
    m[10:14, 10:14] = 9
    m[2:5, 5:8] = 4
    lab, n = components(m)
    assert n == 3 and lab[0, 0] == 0
    assert len({lab[3, 3], lab[12, 12], lab[3, 6]}) == 3


def test_group_glues_superpixels_a_prototype_confidently_shares():
    image, labels, logits, _ = _scene()
    image = image.copy()
    image[150:200, 130:230] = np.where(labels[150:200, 130:230] == KNOWN_ID, 180, image[150:200, 130:230])
    top, bottom = (175, 180), (225, 180)  # the organ's two intensity halves: two superpixels
    glued = partition_slice(labels, logits, None, image, None, PredictConfig(partition_split="group"))
    assert glued[top] == glued[bottom] == KNOWN_ID
    # Without a confident prototype the halves stay apart: superpixels alone would split the organ.
    apart = partition_slice(labels, logits, None, image, None,
                            PredictConfig(partition_split="group", unexplained_threshold=1.01))
    assert apart[top] != apart[bottom] and 0 not in (apart[top], apart[bottom])
