"""PANet (Wang et al., ICCV 2019) for few-shot CT segmentation, batched over episodes.

Shapes: E episodes, S support and Q query slices per episode, K = n_way + 1 label channels (0 is
background), features at stride 8. Two variants (cfg.variant):

- `panet`: prototypes for background and every way by masked average pooling over the support, cosine
  similarity * cfg.scale, cross-entropy of the upsampled logits against the full-resolution query labels,
  plus prototype alignment regularisation (PAR, weight cfg.par_weight): the query's predicted masks make
  prototypes from the query features that must segment the support back.
  Support masks reach feature resolution as area-interpolated one-hots (the fraction of each feature cell
  covered by each class). The official repo upsamples the features to the mask size instead; pooling at
  stride 8 is the same weighted average up to the bilinear kernel, and 64x cheaper in memory and time.
- `seed`: the notebook's model exactly: no background prototype, scale 1, no PAR, masks downsampled with
  nearest, cross-entropy at feature resolution over the episode's ways with background pixels ignored,
  BatchNorm statistics per (episode, support|query) call in train mode. Its predictions are never
  background: to keep one output shape its channel 0 is filled with SEED_BG_LOGIT, a large negative
  number that softmax and argmax ignore.

`decoder: unet` (fsct.model.decoder) replaces the stride-8 fusion with a U-Net/FPN decoder over the encoder's
five stages (resnet18, efficientnet_lite0 or a timm model, from scratch or pretrained; fsct.model.backbones):
embeddings at stride 2, where the same prototype loss and PAR apply, plus a boundary head trained from the
full label maps (`raw`: a border is where two different ids meet; cells that see only background are not
scored, so structures the annotation left out are not learned as "no border") with weight
cfg.boundary_weight. The learned partition (fsct.partition.learned_partition) cuts along that boundary map.

Prototypes, cosine logits and losses are computed in fp32 (autocast disabled there); the encoder may run
under bf16 autocast and in channels_last.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fsct.config import ModelConfig, check_choices
from fsct.errors import FsctError
from fsct.model.backbones import build_encoder
from fsct.model.decoder import UNetDecoder
from fsct.model.encoder import ResNetEncoder

# Seed variant's background channel: exp(-1e4 - x) is 0 in fp32, and -1e4 is exact in bf16 too.
SEED_BG_LOGIT = -1.0e4
PANET_EPS = 1e-5  # the official repo's guard on empty masks
SEED_EPS = 1e-6  # the notebook's


def _fp32(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """Switch autocast off: cosine, softmax and losses stay fp32 even inside a bf16 region."""
    return torch.autocast(device_type=t.device.type, enabled=False)


def one_hot(labels: torch.Tensor, k: int) -> torch.Tensor:
    """(..., H, W) integer labels in 0..k-1 -> (..., k, H, W) float32 one-hot."""
    classes = torch.arange(k, device=labels.device).view(k, 1, 1)
    return (labels.unsqueeze(-3) == classes).float()


def resize(x: torch.Tensor, size: tuple[int, int] | torch.Size, mode: str) -> torch.Tensor:
    """F.interpolate over the last two dims of a (..., C, H, W) tensor of any rank >= 3."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])
    kw = {"align_corners": False} if mode == "bilinear" else {}
    return F.interpolate(flat, size=tuple(size), mode=mode, **kw).reshape(*lead, *flat.shape[-3:-2], *size)


def masked_sums(feats: torch.Tensor, onehot: torch.Tensor, weight: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sums behind masked average pooling, in fp32: feats (..., B, C, h, w), onehot (..., B, K, h, w) ->
    feature sums (..., K, C) and pixel counts (..., K). `weight` (B, K) (unbatched only) counts slice b for
    class k only where it is 1. Sums, not means, so that prediction can add them up over many batches."""
    with _fp32(feats):
        f, m = feats.float(), onehot.float()
        if weight is None:
            return torch.einsum("...bchw,...bkhw->...kc", f, m), m.sum(dim=(-4, -2, -1))
        return torch.einsum("bchw,bkhw,bk->kc", f, m, weight), torch.einsum("bkhw,bk->k", m, weight)


def masked_average(feats: torch.Tensor, onehot: torch.Tensor, eps: float = PANET_EPS) -> torch.Tensor:
    """Masked average pooling over all slices: feats (..., B, C, h, w), onehot (..., B, K, h, w) ->
    prototypes (..., K, C) in fp32 ((B,C,h,w) -> (K,C); (E,S,C,h,w) -> (E,K,C)). A class with no pixels
    gets a zero prototype (its cosine with anything is then 0)."""
    with _fp32(feats):
        sums, counts = masked_sums(feats, onehot)
        return sums / (counts.unsqueeze(-1) + eps)


def cosine_logits(feats: torch.Tensor, protos: torch.Tensor, scale: float) -> torch.Tensor:
    """feats (..., B, C, h, w), prototypes (..., K, C) -> cosine similarity * scale (..., B, K, h, w), fp32."""
    with _fp32(feats):
        f = F.normalize(feats.float(), dim=-3)
        p = F.normalize(protos.float(), dim=-1)
        return scale * torch.einsum("...bchw,...kc->...bkhw", f, p)


class PANet(nn.Module):
    """`model(s_img, s_lbl, q_img, n_way)` -> logits (E, Q, n_way+1, H, W);
    `model(..., q_lbl=q_lbl)` (or `model.loss(...)`) -> {"loss", "ce", "par", "logits"}.

    Training goes through forward (q_lbl given) so that DDP and torch.compile wrappers see the call.
    Inputs: s_img (E,S,1,H,W) float, s_lbl (E,S,H,W) long in 0..n_way, q_img (E,Q,1,H,W),
    q_lbl (E,Q,H,W) long in 0..n_way. Labels are not range-checked (that would sync the GPU).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        check_choices(cfg, "model")  # a ModelConfig made in code has not been through load_config
        self.variant = cfg.variant
        self.scale = 1.0 if cfg.variant == "seed" else float(cfg.scale)
        self.par_weight = 0.0 if cfg.variant == "seed" else float(cfg.par_weight)
        self.eps = SEED_EPS if cfg.variant == "seed" else PANET_EPS
        self.channels_last = cfg.channels_last
        d = cfg.feature_dim
        self.dense_head = cfg.decoder == "unet"
        self.boundary_weight = float(cfg.boundary_weight) if self.dense_head else 0.0
        self.boundary_balanced = cfg.boundary_balanced
        if self.dense_head:
            if cfg.variant == "seed":
                raise FsctError("config: model.variant=seed is the notebook's model: it takes model.decoder=none")
            self.encoder = build_encoder(cfg.encoder, cfg.pretrained)
            self.decoder = UNetDecoder(self.encoder.channels, cfg.decoder_dim, d)
        else:
            if cfg.encoder != "resnet18" or cfg.pretrained:
                raise FsctError("config: model.encoder/model.pretrained other than a scratch resnet18 need "
                                "model.decoder=unet")
            self.encoder = ResNetEncoder(1, d)
            self.fusion = nn.Sequential(nn.Conv2d(d * 3, d, 1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True))
        if cfg.channels_last:
            self.to(memory_format=torch.channels_last)

    # -- building blocks (also used by prediction) -------------------------------------------------------
    def dense(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B,1,H,W) -> features (B,C,h,w) and boundary logits (B,h,w) (None without a decoder): stride 2
        with `decoder: unet`, else the stride-8 fused features."""
        if not self.dense_head:
            return self.features(x), None
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.decoder(self.encoder(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B,1,H,W) -> fused multi-scale features (B,C,H/8,W/8): layer3/4 upsampled to layer2's size
        (with `decoder: unet`: the decoder's embeddings at stride 2)."""
        if self.dense_head:
            return self.dense(x)[0]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        f2, f3, f4 = self.encoder(x)
        size = f2.shape[-2:]
        ups = [f2] + [F.interpolate(f, size=size, mode="bilinear", align_corners=False) for f in (f3, f4)]
        return self.fusion(torch.cat(ups, 1))

    def prototypes(self, feats: torch.Tensor, onehot: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w), (B,K,h,w) -> (K,C); batched (E,S,C,h,w), (E,S,K,h,w) -> (E,K,C)."""
        return masked_average(feats, onehot, self.eps)

    def logits(self, feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w), (K,C) -> (B,K,h,w); batched (E,Q,C,h,w), (E,K,C) -> (E,Q,K,h,w)."""
        return cosine_logits(feats, protos, self.scale)

    def support_onehot(self, labels: torch.Tensor, k: int, size: tuple[int, int] | torch.Size) -> torch.Tensor:
        """Full-resolution labels (..., H, W) -> (..., K, h, w) masks at feature resolution, as the variant
        pools them: area-interpolated one-hot (panet) or nearest-downsampled labels (seed)."""
        if self.variant == "seed":
            small = resize(labels.unsqueeze(-3).float(), size, "nearest").squeeze(-3).long()
            return one_hot(small, k)
        return resize(one_hot(labels, k), size, "area")

    @torch.no_grad()
    def support_prototypes(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                           n_protos: int) -> torch.Tensor:
        """Prototypes (n_protos, C) pooled over a whole support set that comes in batches of (images
        (B,1,H,W) normalised, labels (B,H,W) in 0..n_protos (n_protos: ignored), weight (B,n_protos+1): 1
        where slice b counts for that label). Label 0 is background: a zero prototype for the seed variant,
        which has none (its logit channel is then masked by the caller)."""
        k = n_protos + 1
        sums = counts = None
        for x, labels, weight in batches:
            feats = self.features(x).float()
            s, n = masked_sums(feats, self.support_onehot(labels, k, feats.shape[-2:]), weight)
            sums, counts = (s, n) if sums is None else (sums + s, counts + n)
        if sums is None:
            raise FsctError("no support slices")
        protos = sums[:n_protos] / (counts[:n_protos, None] + self.eps)
        if self.variant == "seed":
            protos[0] = 0  # the notebook has no background prototype
        return protos

    def class_logits(self, feats: torch.Tensor, protos: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) query features, (K,C) prototypes from `support_prototypes` -> (B,K,h,w) logits for
        prediction; the seed variant has no background prototype, so it never predicts background."""
        logits = self.logits(feats, protos)
        if self.variant == "seed":
            logits[:, 0] = -torch.inf
        return logits

    # -- episodes ------------------------------------------------------------------------------------------
    def encode(self, s_img: torch.Tensor, q_img: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> support features (E,S,C,h,w), query features (E,Q,C,h,w), boundary logits (E,S+Q,h,w) or None."""
        e, s, q = s_img.shape[0], s_img.shape[1], q_img.shape[1]
        if self.variant == "seed" and self.training:
            # The notebook encodes each episode's support and query in separate calls: in train mode
            # BatchNorm normalises with each call's own batch statistics, so that is part of its loss.
            feats = [self.features(x) for i in range(e) for x in (s_img[i], q_img[i])]
            return torch.stack(feats[0::2]), torch.stack(feats[1::2]), None
        # One encoder call for support and query of all episodes: fewer, larger kernels.
        f, b = self.dense(torch.cat([s_img.flatten(0, 1), q_img.flatten(0, 1)]))
        b = None if b is None else b.unflatten(0, (e, s + q))
        return f[: e * s].unflatten(0, (e, s)), f[e * s :].unflatten(0, (e, q)), b

    def forward(
        self,
        s_img: torch.Tensor,
        s_lbl: torch.Tensor,
        q_img: torch.Tensor,
        n_way: int,
        q_lbl: torch.Tensor | None = None,
        raw: torch.Tensor | None = None,
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        k = n_way + 1
        size = q_img.shape[-2:]
        sf, qf, bnd = self.encode(s_img, q_img)
        with _fp32(sf):
            sf, qf = sf.float(), qf.float()
            protos = self.prototypes(sf, self.support_onehot(s_lbl, k, sf.shape[-2:]))  # (E,K,C)
            if self.variant == "seed":
                low = self.logits(qf, protos[:, 1:])  # ways only: no background prototype
                fg = resize(low, size, "bilinear")
                bg = fg.new_full((*fg.shape[:2], 1, *fg.shape[3:]), SEED_BG_LOGIT)
                logits = torch.cat([bg, fg], dim=2)
            else:
                low = self.logits(qf, protos)  # (E,Q,K,h,w)
                logits = resize(low, size, "bilinear")
            if q_lbl is None:
                return logits
            if self.variant == "seed":
                ce = self._seed_ce(low, q_lbl)
            else:
                ce = F.cross_entropy(logits.flatten(0, 1), q_lbl.flatten(0, 1))
            par = self._par(sf, s_lbl, qf, low, k) if self.par_weight > 0 else ce.new_zeros(())
            terms = {"loss": ce + self.par_weight * par, "ce": ce, "par": par, "logits": logits}
            if bnd is not None and self.boundary_weight > 0:
                terms["boundary"] = boundary_loss(bnd.float(), raw, self.boundary_balanced)
                terms["loss"] = terms["loss"] + self.boundary_weight * terms["boundary"]
            return terms

    def loss(
        self, s_img: torch.Tensor, s_lbl: torch.Tensor, q_img: torch.Tensor, q_lbl: torch.Tensor, n_way: int,
        raw: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """{"loss": total, "ce", "par" (0 when off), "boundary" (dense model), "logits": (E,Q,n_way+1,H,W)}."""
        return self(s_img, s_lbl, q_img, n_way, q_lbl=q_lbl, raw=raw)

    def _seed_ce(self, low: torch.Tensor, q_lbl: torch.Tensor) -> torch.Tensor:
        """The notebook's loss: CE at feature resolution over the ways, background ignored, one mean per
        episode (the notebook has one episode per step), then the mean over episodes. Like the notebook's,
        it is NaN for an episode whose queries hold no pixel of any way (the sampler never draws one)."""
        e = low.shape[0]
        target = resize(q_lbl.unsqueeze(-3).float(), low.shape[-2:], "nearest").squeeze(-3).long() - 1
        per_px = F.cross_entropy(low.flatten(0, 1), target.flatten(0, 1), ignore_index=-1, reduction="none")
        valid = (target >= 0).reshape(e, -1).sum(1)
        return (per_px.reshape(e, -1).sum(1) / valid).mean()

    def _par(self, sf: torch.Tensor, s_lbl: torch.Tensor, qf: torch.Tensor, low: torch.Tensor, k: int) -> torch.Tensor:
        """Prototype alignment: prototypes from the query's predicted masks (argmax: no gradient through the
        masks, gradients flow through the query features) segment the support, CE vs its labels. All
        classes at once (the official repo does one binary problem per way); a class the query does not
        predict gets a zero prototype, i.e. logit 0."""
        pred = one_hot(low.detach().argmax(2), k)  # (E,Q,K,h,w)
        q_protos = self.prototypes(qf, pred)  # (E,K,C)
        s_logits = resize(self.logits(sf, q_protos), s_lbl.shape[-2:], "bilinear")
        return F.cross_entropy(s_logits.flatten(0, 1), s_lbl.flatten(0, 1))


def boundary_target(raw: torch.Tensor, size: tuple[int, int] | torch.Size) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-resolution label ids (B,H,W) -> (border, scored) float maps (B,h,w): a cell is a border when two
    different ids meet within a pixel of it; it is scored when it sees any labelled pixel."""
    x = raw.float().unsqueeze(1)
    hi = F.max_pool2d(x, 3, 1, 1)
    lo = -F.max_pool2d(-x, 3, 1, 1)
    border = (hi != lo).float()
    seen = (hi > 0).float()
    factor = raw.shape[-1] // size[-1]
    if factor > 1:
        border, seen = F.max_pool2d(border, factor), F.max_pool2d(seen, factor)
    return border.squeeze(1), seen.squeeze(1)


def boundary_loss(logits: torch.Tensor, raw: torch.Tensor | None, balanced: bool = False) -> torch.Tensor:
    """BCE of the boundary logits (E,N,h,w) against the borders of the raw label maps (E,N,H,W), mean over
    scored cells; `balanced`: border and inside cells each carry half the weight (HED, Xie & Tu 2015), so
    borders, a few % of the cells, are pushed towards 1 rather than left near 0.5. Without label maps
    (superpixel episodes) the head still joins the graph with weight 0, so DDP sees a gradient for every
    parameter."""
    if raw is None:
        return logits.sum() * 0.0
    with _fp32(logits):
        border, seen = boundary_target(raw.flatten(0, 1), logits.shape[-2:])
        per = F.binary_cross_entropy_with_logits(logits.flatten(0, 1).float(), border, reduction="none")
        if not balanced:
            return (per * seen).sum() / seen.sum().clamp_min(1.0)
        pos, neg = border * seen, (1 - border) * seen
        return 0.5 * ((per * pos).sum() / pos.sum().clamp_min(1.0) + (per * neg).sum() / neg.sum().clamp_min(1.0))


def build_model(cfg: ModelConfig) -> nn.Module:
    """PANet in channels_last when cfg.channels_last (weights at construction, inputs in features()),
    and, when cfg.compile, with the whole module compiled in place (nn.Module.compile): the training
    forward including the losses becomes one graph, and state_dict keys stay unprefixed. Calls to
    `features`/`prototypes`/`logits` from outside forward (prediction) run eager."""
    model = PANet(cfg)
    if cfg.compile:
        model.compile()
    return model
