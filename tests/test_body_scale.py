"""Body-scale windows (fsct.body_scale): another patient's body seen at the training slices' size, and the
partition drawn there mapped back to the slice's own pixels, alike in validation and prediction."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fsct.body_scale import body_frames, body_size, from_frames, median_body_size, to_frames
from fsct.config import PredictConfig
from fsct.data.challenge import list_images, read_image, read_labels
from fsct.metrics import official_score_slice
from fsct.predict import framed_maps, learned_masks
from fsct.threshold import GRID, threshold_scores


def zoomed(a: np.ndarray, zoom: float, nearest: bool) -> np.ndarray:
    """A slice (or label map) with its content `zoom` times as wide about the image's centre, air around."""
    n = a.shape[-1]
    c = (n - 1) / 2
    coeffs = (1 / zoom, 0, c - c / zoom, 0, 1 / zoom, c - c / zoom)
    img = Image.fromarray(a.astype(np.int32) if nearest else a)
    out = img.transform((n, n), Image.Transform.AFFINE, coeffs,
                        Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR, fillcolor=0)
    return np.asarray(out).astype(a.dtype)


@pytest.fixture(scope="module")
def slices(realct_dir) -> tuple[np.ndarray, np.ndarray]:
    """The fixture's 8 labelled real-CT slices and their label maps."""
    paths = list_images(realct_dir / "X_train" / "images")
    _, masks = read_labels(realct_dir / "Y_train.csv.gz", [p.name for p in paths])
    return np.stack([read_image(p) for p in paths[:8]]), masks[:8]


def test_body_size_is_scale_free_and_a_window_restores_it(slices):
    images, _ = slices
    size = median_body_size(images)
    assert 0.5 < size < 0.95
    small = np.stack([zoomed(im, 0.7, nearest=False) for im in images])
    ratios = [body_size(s) / body_size(im) for s, im in zip(small, images, strict=True)]
    np.testing.assert_allclose(ratios, 0.7, atol=0.01)

    # slices at the training's scale are left exactly as they are
    same = body_frames(torch.from_numpy(images), size, tolerance=0.15)
    assert not bool(same.moved.any())
    assert torch.equal(to_frames(torch.from_numpy(images), same), torch.from_numpy(images))
    # a 0.7 zoom is seen through a window 0.7 wide: its body is back at the training size
    frames = body_frames(torch.from_numpy(small), size, tolerance=0.15)
    assert bool(frames.moved.all())
    seen = to_frames(torch.from_numpy(small), frames).numpy()
    np.testing.assert_allclose([body_size(s) / body_size(im) for s, im in zip(seen, images, strict=True)], 1.0,
                               atol=0.03)
    # smaller by less than the tolerance, larger bodies, or no body size at all: as they are
    assert not bool(body_frames(torch.from_numpy(small), size, tolerance=0.35).moved.any())
    large = torch.from_numpy(np.stack([zoomed(im, 1.2, nearest=False) for im in images]))
    assert not bool(body_frames(large, size, tolerance=0.15).moved.any())
    assert not bool(body_frames(torch.from_numpy(small), 0.0, tolerance=0.15).moved.any())


def test_a_partition_drawn_in_the_window_maps_back_onto_the_slice(slices):
    images, masks = slices
    small = torch.from_numpy(np.stack([zoomed(im, 0.7, nearest=False) for im in images]))
    truth = np.stack([zoomed(m, 0.7, nearest=True) for m in masks])
    frames = body_frames(small, median_body_size(images), tolerance=0.15)
    drawn = to_frames(torch.from_numpy(truth), frames, nearest=True).numpy()
    assert (drawn > 0).sum() > 1.5 * (truth > 0).sum()  # magnified in the window
    back = from_frames(drawn, frames)
    fg = truth > 0
    assert (back[fg] == truth[fg]).mean() > 0.99
    assert [official_score_slice(t, b) for t, b in zip(truth, back, strict=True)] == pytest.approx([1.0] * 8, abs=0.01)


class Edges(nn.Module):
    """A dense model whose boundary map is the image's gradient: its partition follows intensity edges."""

    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.tensor(10.0))

    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = nn.functional.avg_pool2d(x, 2)
        edge = (x - x.roll(1, -1)).abs() + (x - x.roll(1, -2)).abs()
        return torch.cat([x, x.roll(3, -1)], 1), (self.gain * edge - 3).squeeze(1)


def test_validation_scores_what_predict_draws_through_the_windows(slices):
    images, masks = slices
    small = torch.from_numpy(np.stack([zoomed(im, 0.7, nearest=False) for im in images[:3]]))
    truth = np.stack([zoomed(m, 0.7, nearest=True) for m in masks[:3]])
    cfg = PredictConfig(mode="partition", partition_split="learned", embedding_weight=0.6, min_regions=4,
                        body_size=median_body_size(images))
    model = Edges()
    m = framed_maps(model, small, cfg, 256)
    assert bool(m.frames.moved.all())
    scores = threshold_scores(m.prob, m.seen.numpy(), truth, cfg, GRID, m.emb, m.frames)
    for t in (GRID[4], GRID[10]):
        parts = learned_masks(model, small, replace(cfg, boundary_threshold=t), 256)
        assert parts.shape == (3, 512, 512)
        got = [official_score_slice(tr, p) for tr, p in zip(truth, parts, strict=True)]
        np.testing.assert_allclose(scores[GRID.index(t)], got)
    # without the windows the same model draws another partition of these slices
    plain = learned_masks(model, small, replace(cfg, body_size=0.0, boundary_threshold=GRID[4]), 256)
    assert not np.array_equal(plain, learned_masks(model, small, replace(cfg, boundary_threshold=GRID[4]), 256))
