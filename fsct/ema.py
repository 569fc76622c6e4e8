"""A moving average of the trained weights (`train.ema_decay`): what training validates, keeps as best/ and
saves as the model, when on.

With a few hundred steps of a few episodes each, the weights at any one step carry the noise of the last
steps' episodes, and a checkpoint's score moves by several points from one validation to the next
(docs/RESULTS.md). The average over the last ~1 / (1 - decay) steps smooths that noise out. The trained
weights themselves are untouched: the optimizer and the gradients see only them. On realct-mini's
blocks over three seeds it scored level with the trained weights (docs/RESULTS.md), so the recipes leave it
off."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from fsct.checkpoint import host_weights

FILE = "ema.safetensors"  # beside model.safetensors in each training checkpoint: the average at that step


class WeightAverage:
    """A second model holding the average, started from the trained one's weights. Checkpoints hold it as
    FILE (not through Accelerate's registered objects, which refuse a checkpoint written with the average
    off), so a run can turn it on when it resumes."""

    def __init__(self, average: nn.Module, trained: nn.Module, decay: float) -> None:
        # a fresh module, not a deepcopy: a module compiled in place would carry a compiled call of the
        # original's forward into its copy
        self.model = average.requires_grad_(False).eval()
        self.model.load_state_dict(trained.state_dict())
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold in the trained weights after an optimizer step. The first steps' decay is lower ((1 + n) /
        (10 + n)), so the random init does not linger in a short run's average."""
        self.updates += 1
        keep = min(self.decay, (1 + self.updates) / (10 + self.updates))
        pairs = list(zip(self.model.state_dict().values(), model.state_dict().values(), strict=True))
        floats = [(a, n.detach()) for a, n in pairs if a.is_floating_point()]
        # one fused kernel per dtype group on a GPU, as timm's ModelEmaV3 does, not one launch per tensor
        torch._foreach_lerp_([a for a, _ in floats], [n.to(a.dtype) for a, n in floats], 1.0 - keep)
        for avg, now in pairs:
            if not avg.is_floating_point():  # counters (BatchNorm's num_batches_tracked)
                avg.copy_(now)

    def save(self, folder: Path) -> None:
        """The average as a model file in `folder` (`fsct.checkpoint.load_model(folder / FILE)` reads it
        with the run's config.yaml beside it), its update count in the file's metadata."""
        from safetensors.torch import save_file

        save_file(host_weights(self.model), str(folder / FILE), metadata={"updates": str(self.updates)})

    def load(self, folder: Path) -> bool:
        """Continue the average a checkpoint folder holds; False when it holds none (a run that had the
        average off until now: it then starts here, from the resumed weights it was made from)."""
        from safetensors import safe_open

        if not (folder / FILE).is_file():
            return False
        with safe_open(str(folder / FILE), framework="pt") as f:
            self.model.load_state_dict({k: f.get_tensor(k) for k in f.keys()})
            self.updates = int((f.metadata() or {}).get("updates", 0))
        return True
