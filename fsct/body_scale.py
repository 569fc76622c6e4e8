"""The body's scale, set to the training slices' before a dense model draws a partition.

Another patient is slimmer, or scanned with a wider field of view: the body then fills less of the slice
than it did in training, each structure covers fewer cells of the model's stride-2 maps, and thin ones lose
their inside. On realct-mini's test blocks zoomed out to 0.7 the learned partition loses 0.04-0.05 while
superpixels gain (docs/RESULTS.md, "Another patient, simulated"). So a slice whose body is smaller than the
training slices' median by more than the training's zoom augmentation covers is looked at through a square
window centred on its body and sized so that the body appears at the training size; the partition drawn
there is mapped back to the slice's own pixels. Other slices are left exactly as they are.

A body's size is sqrt(its area / the slice's area) for the body mask of fsct.data.superpixels (the largest
component above the air threshold, holes filled), measured at 128 px so every resolution measures alike."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fsct.data.superpixels import body_mask

# At 128 px one opening drops what two drop at 256 (the table, ~10 px at 512); two at 128 erode a small body
# by more than a large one, one measures a 0.7 zoom as 0.7 (tests/test_body_scale.py).
MEASURE_SIZE, OPENING = 128, 1
MIN_RATIO = 0.5  # a body mask under half the training size is a failed measurement, not a patient


def _body(image: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(np.ascontiguousarray(image))[None, None].float()
    return body_mask(F.interpolate(x, size=(MEASURE_SIZE, MEASURE_SIZE), mode="area")[0, 0].numpy(), opening=OPENING)


def body_size(image: np.ndarray) -> float:
    """sqrt(body area / slice area) of one uint8 slice (0 without a body)."""
    return float(np.sqrt(_body(image).mean()))


def median_body_size(images: np.ndarray) -> float:
    """The median body size of a stack of uint8 slices: what `predict.body_size` holds for a model."""
    sizes = [s for s in (body_size(im) for im in images) if s > 0]
    return float(np.median(sizes)) if sizes else 0.0


@dataclass
class Frames:
    """Per slice, the window the model looks through: `ratio` (the window's side over the slice's; 1 = the
    slice itself) and its centre, in grid_sample's [-1, 1] coordinates."""

    ratio: torch.Tensor  # (B,)
    centre: torch.Tensor  # (B, 2): x, y

    @property
    def moved(self) -> torch.Tensor:
        return self.ratio != 1

    def select(self, i: int) -> Frames:
        return Frames(self.ratio[i:i + 1], self.centre[i:i + 1])


def body_frames(images: torch.Tensor, size: float, tolerance: float) -> Frames:
    """uint8 (B,H,W) slices -> their windows for a model trained on bodies of `size` (0: every slice as it is).
    A slice whose body is smaller than `size` by more than the fraction `tolerance` is magnified; the others
    keep their own frames: a larger body gives each structure more cells than training did, and shrinking
    it would discard them (zoom 1.25 scored as the unshifted slices without a window)."""
    b = images.shape[0]
    ratio, centre = torch.ones(b), torch.zeros(b, 2)
    if size > 0:
        for i, im in enumerate(images.cpu().numpy()):
            body = _body(im)
            r = float(np.sqrt(body.mean())) / size
            if MIN_RATIO <= r < 1 - tolerance:
                ys, xs = np.nonzero(body)
                ratio[i] = r
                centre[i] = torch.from_numpy((np.array([xs.mean(), ys.mean()]) + 0.5) / MEASURE_SIZE * 2 - 1)
    dev = images.device
    return Frames(ratio.to(dev), centre.to(dev))


def _sample(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, mode: str) -> torch.Tensor:
    """x (B,C,H,W) resampled at input coordinates scale * out + shift (per slice), zeros outside."""
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = scale
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode=mode, padding_mode="zeros", align_corners=False)


def to_frames(images: torch.Tensor, frames: Frames, nearest: bool = False) -> torch.Tensor:
    """uint8 (B,H,W) slices (label maps with `nearest`) as seen through their windows, the same size (0, air,
    outside the slice)."""
    if not bool(frames.moved.any()):
        return images
    seen = _sample(images[:, None].float(), frames.ratio, frames.centre, "nearest" if nearest else "bilinear")
    seen = seen[:, 0].round().clamp(0, 255).to(images.dtype)
    return torch.where(frames.moved[:, None, None], seen, images)


def from_frames(parts: np.ndarray, frames: Frames) -> np.ndarray:
    """Partitions (B,S,S) drawn in the windows -> the slices' own pixels (nearest; 0 outside the window).
    Ids pass through float32: exact below 2**24."""
    moved = frames.moved.cpu()
    if not bool(moved.any()):
        return parts
    out = parts.copy()
    idx = torch.nonzero(moved)[:, 0]
    ratio, centre = frames.ratio.cpu()[idx], frames.centre.cpu()[idx]
    back = _sample(torch.from_numpy(parts[idx.numpy()])[:, None].float(), 1 / ratio, -centre / ratio[:, None],
                   "nearest")
    out[idx.numpy()] = back[:, 0].round().numpy().astype(parts.dtype)
    return out


def unframed(part: np.ndarray, frame: Frames | None) -> np.ndarray:
    """One slice's partition (S,S) drawn in its window (`frame`, one slice; None: its own frame) -> its pixels."""
    return part if frame is None else from_frames(part[None], frame)[0]
