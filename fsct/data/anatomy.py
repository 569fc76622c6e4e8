"""Synthetic axial CT anatomy: the structures (ids, names, which are test-only) and `generate_slice`, one
slice painted in Hounsfield units in a body frame (units of the body's half-height, +v posterior, +u the
patient's left as in radiological display), pushed through a per-slice affine and a smooth random warp,
then windowed -1000..1000 HU -> 0..255 like realct-mini. `fsct synth` (fsct.data.synth) writes data sets
of these slices.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

SIZE = 512

# (name, test_only). Ids are positions + 1. "right"/"left" are the patient's sides.
_STRUCTURES: tuple[tuple[str, bool], ...] = (
    ("liver", False), ("spleen", False), ("kidney_right", False), ("kidney_left", False),
    ("stomach", False), ("pancreas", False), ("gallbladder", False), ("urinary_bladder", False),
    ("aorta", False), ("inferior_vena_cava", False), ("portal_vein", False), ("heart", False),
    ("lung_right", False), ("lung_left", False), ("esophagus", False), ("trachea", False),
    ("vertebra", False), ("spinal_cord", False), ("ribs_right", False), ("ribs_left", False),
    ("sternum", False), ("hip_right", False), ("hip_left", False), ("sacrum", False),
    ("femur_right", False), ("femur_left", False), ("autochthon_right", False), ("autochthon_left", False),
    ("psoas_right", False), ("psoas_left", False), ("gluteus_right", False), ("gluteus_left", False),
    ("small_bowel", False), ("colon", False), ("duodenum", False), ("adrenal_right", False),
    ("adrenal_left", False), ("iliac_artery_right", False), ("iliac_artery_left", False), ("rectum", False),
    # Zero-shot part: these only ever occur in test slices.
    ("liver_lesion", True), ("kidney_cyst", True), ("lung_nodule", True), ("bone_metastasis", True),
)


@dataclass(frozen=True)
class Structure:
    id: int
    name: str
    test_only: bool


STRUCTURES: tuple[Structure, ...] = tuple(Structure(i + 1, n, t) for i, (n, t) in enumerate(_STRUCTURES))
N_CLASSES = len(STRUCTURES)
TEST_ONLY_IDS: tuple[int, ...] = tuple(s.id for s in STRUCTURES if s.test_only)


def _id(name: str) -> int:
    for s in STRUCTURES:
        if s.name == name:
            return s.id
    raise KeyError(name)


def _profile(z: float, z0: float, z1: float) -> float:
    """Cross-section of an ellipsoid spanning levels z0..z1 (0 outside): organs taper at their ends."""
    if not z0 < z < z1:
        return 0.0
    t = (2 * z - z0 - z1) / (z1 - z0)
    return math.sqrt(1 - t * t)


def _smooth_field(rng: np.random.Generator, cells: int, amp: float) -> np.ndarray:
    """Low-frequency noise on the full grid: a coarse normal grid through a separable Gaussian basis
    (a matrix product: ~30x faster than ndimage.zoom at 512x512)."""
    coarse = rng.standard_normal((cells + 2, cells + 2)).astype(np.float32)
    step = SIZE / cells
    centres = (np.arange(cells + 2) - 0.5) * step
    x = np.arange(SIZE, dtype=np.float32) + 0.5
    basis = np.exp(-0.5 * ((x[:, None] - centres[None, :]) / (0.6 * step)) ** 2).astype(np.float32)
    basis /= np.sqrt((basis**2).sum(axis=1, keepdims=True))
    return (basis @ coarse @ basis.T) * np.float32(amp)


class _Canvas:
    """One slice being painted: HU image, label map, and per-pixel body coordinates."""

    def __init__(self, rng: np.random.Generator, z: float):
        self.rng = rng
        self.z = z
        self.hu = np.full((SIZE, SIZE), -1000.0, np.float32)
        self.lab = np.zeros((SIZE, SIZE), np.uint8)
        pelvis = max(0.0, (z - 0.7) / 0.3)
        self.S = float(rng.uniform(150, 185))  # body half-height in pixels
        self.W = float(rng.uniform(1.18, 1.38) + 0.12 * pelvis)  # half-width / half-height
        self.S = min(self.S, 238 / self.W)  # keep wide (pelvic) bodies inside the field of view
        self.ws = self.W / 1.28  # anatomy positions are laid out for a 1.28 body
        self.rot = float(rng.normal(0, 0.06))
        self.cx = float(256 + rng.normal(0, 10))
        self.cy = float(248 + rng.normal(0, 8))
        dx = _smooth_field(rng, 6, 5.0)
        dy = _smooth_field(rng, 6, 5.0)
        self.margin = float(max(np.abs(dx).max(), np.abs(dy).max())) + 3
        yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
        xw, yw = xx + dx - self.cx, yy + dy - self.cy
        c, s = math.cos(self.rot), math.sin(self.rot)
        self.U = (xw * c + yw * s) / self.S
        self.V = (-xw * s + yw * c) / self.S
        self._body()

    def keep(self, p: float = 0.96) -> bool:
        """Whether a structure that may be absent is drawn on this slice."""
        return bool(self.rng.random() < p)

    def to_pixel(self, u: float, v: float) -> tuple[float, float]:
        c, s = math.cos(self.rot), math.sin(self.rot)
        return self.cx + self.S * (u * c - v * s), self.cy + self.S * (u * s + v * c)

    def _body(self) -> None:
        rng = self.rng
        uu, vv = self.U / self.W, self.V
        th = np.arctan2(vv, uu)
        # The back lies on the table: flatter (superellipse) posteriorly.
        p = np.where(vv > 0, np.float32(rng.uniform(2.4, 3.0)), np.float32(2.0))
        rb = (np.abs(uu) ** p + np.abs(vv) ** p) ** (1 / p)
        wob = 1 + sum(rng.normal(0, 0.025 / k) * np.cos(k * th + rng.uniform(0, 6.3)) for k in (2, 3, 4, 5))
        rb = rb / wob
        fat = rng.uniform(0.03, 0.13) * (1 + 0.5 * np.clip(-np.sin(th), 0, 1) + 0.3 * np.abs(np.cos(th)))
        muscle = rng.uniform(0.035, 0.06)
        self.body = rb < 1
        self.cavity_r = rb / (1 - fat - muscle)  # < 1 inside the muscle wall
        self.cavity = self.cavity_r < 1
        self.theta = th
        self.hu[self.body] = -100 + rng.normal(0, 8)
        self.hu[(rb < 1 - fat) & ~self.cavity] = 50
        self._table(rb)

    def _table(self, rb: np.ndarray) -> None:
        # The CT table: a curved band under the back, unlabelled.
        ys = np.nonzero(self.body.any(axis=1))[0]
        bottom = float(ys.max()) if len(ys) else 420.0
        yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
        curve = bottom + 4 - 0.0011 * (xx - self.cx) ** 2
        band = (yy > curve) & (yy < curve + 6) & ~self.body
        self.hu[band] = -350
        self.hu[(yy > curve + 30) & (yy < curve + 33) & ~self.body] = -150

    def shape(self, u: float, v: float, ru: float, rv: float, ang: float = 0.0, wob: float = 0.08,
              scaled: bool = True) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Normalised radius t (< 1 inside) of a wobbly ellipse, on its pixel bounding box only."""
        if scaled:
            u *= self.ws
        px, py = self.to_pixel(u, v)
        ext = max(ru, rv) * (1 + 2 * wob) * self.S + self.margin
        y0, y1 = max(0, int(py - ext)), min(SIZE, int(py + ext) + 1)
        x0, x1 = max(0, int(px - ext)), min(SIZE, int(px + ext) + 1)
        if y0 >= y1 or x0 >= x1:
            return None
        sl = (slice(y0, y1), slice(x0, x1))
        du, dv = self.U[sl] - u, self.V[sl] - v
        c, s = math.cos(ang), math.sin(ang)
        a = (du * c + dv * s) / ru
        b = (-du * s + dv * c) / rv
        t = np.hypot(a, b)
        if wob > 0:
            th = np.arctan2(b, a)
            bound = 1 + sum(self.rng.uniform(-wob, wob) / k * np.cos(k * th + self.rng.uniform(0, 6.3))
                            for k in (1, 2, 3, 4))
            t = t / bound
        return sl, t

    def paint(self, sl: tuple[slice, slice], region: np.ndarray, hu: float | np.ndarray,
              label: int | None, within: str = "cavity") -> None:
        if within == "cavity":
            region = region & self.cavity[sl]
        elif within == "body":
            region = region & self.body[sl]
        h = self.hu[sl]
        h[region] = hu[region] if isinstance(hu, np.ndarray) else hu
        if label is not None:
            self.lab[sl][region] = label

    def organ(self, name: str | None, u: float, v: float, ru: float, rv: float, hu: float,
              ang: float = 0.0, wob: float = 0.08, within: str = "cavity", jitter: float = 0.03
              ) -> tuple[tuple[slice, slice], np.ndarray] | None:
        """Jittered wobbly ellipse painted with one HU value; returns (box, t) for inner detail."""
        rng = self.rng
        got = self.shape(u + rng.normal(0, jitter), v + rng.normal(0, jitter), ru * rng.uniform(0.88, 1.12),
                         rv * rng.uniform(0.88, 1.12), ang + rng.normal(0, 0.12), wob)
        if got is None:
            return None
        sl, t = got
        self.paint(sl, t < 1, hu + rng.normal(0, 4), _id(name) if name else None, within)
        return got

    def bone(self, name: str, u: float, v: float, ru: float, rv: float, ang: float = 0.0,
             wob: float = 0.06, cortex: float = 0.84) -> tuple[tuple[slice, slice], np.ndarray] | None:
        got = self.organ(name, u, v, ru, rv, 850, ang, wob, within="body", jitter=0.015)
        if got is not None:
            sl, t = got
            self.paint(sl, t < cortex, _marrow(self.rng, t.shape), None, within="body")
        return got

    def hollow(self, name: str, u: float, v: float, ru: float, rv: float, ang: float = 0.0,
               gas: float = 0.4, wob: float = 0.12) -> None:
        """Bowel-like: soft-tissue wall, lumen with gas on top (the patient is supine) over fluid/stool."""
        got = self.organ(name, u, v, ru, rv, 40, ang, wob)
        if got is None:
            return
        sl, t = got
        lumen = t < self.rng.uniform(0.65, 0.85)
        vv = self.V[sl]
        vals = vv[lumen]
        if vals.size == 0:
            return
        level = np.quantile(vals, min(max(gas, 0.0), 1.0))
        content = np.where(vv < level, np.float32(-950), np.float32(self.rng.uniform(-60, 20)))
        self.paint(sl, lumen, content, None)


def _draw(c: _Canvas, lesion_prob: float) -> None:
    """Paint one slice's anatomy, in an order that matters twice: later structures paint over earlier
    ones, and every section draws from the same generator (reordering would change every slice)."""
    if c.z >= 0.3:  # intra-abdominal fat with mesenteric soft-tissue strands
        strands = _smooth_field(c.rng, 40, 1.0) > 0.7
        c.hu[c.cavity & strands] = 25
    _muscles(c)
    _thorax(c, lesion_prob)
    _upper_abdomen(c)
    _lower_abdomen(c, lesion_prob)
    _vessels(c)
    _skeleton(c, lesion_prob)


def _muscles(c: _Canvas) -> None:
    """Back muscles and buttocks first: bones and organs paint over their edges."""
    z = c.z
    pelvis = z > 0.78
    if z < 0.88:
        k = 1.0 - 0.35 * max(0.0, (z - 0.6) / 0.3)
        for side, name in ((-1, "autochthon_right"), (1, "autochthon_left")):
            c.organ(name, side * 0.26, 0.62, 0.2 * k, 0.17 * k, 55, side * 0.2, within="body")
    if pelvis:
        g = 0.55 + 0.45 * min(1.0, (z - 0.78) / 0.12)
        for side, name in ((-1, "gluteus_right"), (1, "gluteus_left")):
            c.organ(name, side * 0.6, 0.5, 0.33 * g, 0.26 * g, 55, side * -0.4, within="body")


def _thorax(c: _Canvas, lesion_prob: float) -> None:
    """Thorax: lungs, heart, mediastinum (and the oesophagus down to the upper abdomen)."""
    z = c.z
    thorax = z < 0.3
    if z < 0.33:
        lung = 0.35 + 0.65 * math.sqrt(max(0.0, 1 - (z / 0.33) ** 2))
        for side, name in ((-1, "lung_right"), (1, "lung_left")):
            got = c.organ(name, side * 0.56, 0.05 + 0.25 * (1 - lung), 0.46 * lung, 0.66 * lung, -860,
                          side * 0.15, wob=0.1)
            if got is None:
                continue
            _lung_vessels(c, name, side, got[0])
            if lesion_prob > 0 and c.keep(lesion_prob):
                _lesion(c, name, "lung_nodule", 0.02, 0.05, 35)
        if 0.06 < z < 0.31 and c.keep(0.98):
            h = 0.45 + 0.55 * _profile(z, 0.04, 0.34)
            got = c.organ("heart", 0.12, -0.32, 0.42 * h, 0.36 * h, 45, -0.5, wob=0.06)
            if got is not None:
                sl, t = got
                for du, dv in ((-0.12, 0.05), (0.12, -0.05)):
                    ch = c.shape(0.12 + du, -0.32 + dv, 0.15 * h, 0.13 * h, 0.3, 0.1)
                    if ch is not None:
                        csl, ct = ch
                        c.paint(csl, (ct < 1) & (c.lab[csl] == _id("heart")), 260, None)
        if z < 0.14:
            c.hollow("trachea", 0.0, -0.22, 0.08, 0.075, gas=1.0, wob=0.03)
        if z < 0.2 and c.keep(0.9):
            c.organ("aorta", -0.08, -0.42, 0.08, 0.08, 330, wob=0.02)  # ascending
        if z < 0.26:
            c.organ("sternum", 0.0, -0.9, 0.12, 0.045, 950, wob=0.05, within="body", jitter=0.01)
            c.paint(*_inner(c, "sternum", 0.6), 420, None, within="body")
    if z < 0.45:
        c.hollow("esophagus", 0.03, -0.02 if thorax else -0.1, 0.045, 0.04, gas=0.15, wob=0.05)


def _upper_abdomen(c: _Canvas) -> None:
    """Upper abdomen."""
    rng, z = c.rng, c.z
    liver = _profile(z, 0.2, 0.62)
    if liver > 0:
        got = c.organ("liver", -0.5, -0.12, 0.42 + 0.22 * liver, 0.32 + 0.36 * liver, 62, -0.35, wob=0.1)
        if got is not None:
            _spots(c, "liver", got[0], int(rng.integers(3, 8)), 0.01, 0.025, 150)  # contrast-filled vessels
    spleen = _profile(z, 0.24, 0.5)
    if spleen > 0 and c.keep(0.97):
        c.organ("spleen", 0.74, 0.12, 0.12 + 0.08 * spleen, 0.16 + 0.16 * spleen, 52, 0.55, wob=0.1)
    stomach = _profile(z, 0.2, 0.52)
    if stomach > 0:
        c.hollow("stomach", 0.38, -0.38, 0.18 + 0.16 * stomach, 0.14 + 0.12 * stomach, -0.3,
                 gas=rng.uniform(0.1, 0.5), wob=0.15)
    if 0.4 < z < 0.52 and c.keep(0.85):
        c.organ("gallbladder", -0.38, -0.42, 0.09, 0.11, 12, 0.3, wob=0.08)
    if 0.4 < z < 0.5:
        c.organ("portal_vein", -0.14, -0.1, 0.07, 0.05, 210, 0.4, wob=0.05)
    pancreas = _profile(z, 0.42, 0.56)
    if pancreas > 0:
        c.organ("pancreas", 0.12, -0.14, 0.2 + 0.18 * pancreas, 0.05 + 0.03 * pancreas, 45, -0.25, wob=0.2)
    if 0.45 < z < 0.6:
        c.hollow("duodenum", -0.26, -0.12, 0.08, 0.07, gas=rng.uniform(0, 0.5), wob=0.15)
    for side, name in ((-1, "adrenal_right"), (1, "adrenal_left")):
        if 0.37 < z < 0.46 and c.keep(0.9):
            c.organ(name, side * 0.22, 0.02, 0.06, 0.022, 30, side * 1.1, wob=0.2)


def _lower_abdomen(c: _Canvas, lesion_prob: float) -> None:
    """Lower abdomen and pelvis: bowel first, solid organs over it."""
    rng, z = c.rng, c.z
    liver = _profile(z, 0.2, 0.62)
    if 0.48 < z < 0.86:
        for _ in range(int(rng.integers(5, 12))):
            u, v = rng.uniform(-0.55, 0.55), rng.uniform(-0.72, -0.05)
            ru, rv = rng.uniform(0.06, 0.1), rng.uniform(0.05, 0.09)
            c.hollow("small_bowel", u, v, ru, rv, rng.uniform(0, 3.1), gas=rng.uniform(0, 0.4), wob=0.15)
    if 0.45 < z < 0.85:
        c.hollow("colon", -0.86, -0.12, 0.13, 0.12, gas=rng.uniform(0.2, 0.7), wob=0.15)
    if 0.38 < z < 0.85:
        c.hollow("colon", 0.9, -0.02, 0.11, 0.11, gas=rng.uniform(0.2, 0.7), wob=0.15)
    if 0.42 < z < 0.56:
        c.hollow("colon", 0.0, -0.66, 0.42, 0.11, gas=rng.uniform(0.3, 0.8), wob=0.12)
    if 0.82 < z < 0.93:
        c.hollow("colon", 0.3, -0.15, 0.15, 0.1, 0.5, gas=rng.uniform(0.2, 0.7), wob=0.15)
    for side, name in ((-1, "kidney_right"), (1, "kidney_left")):
        kid = _profile(z, 0.4 + 0.03 * (side < 0), 0.68 + 0.03 * (side < 0))
        if kid > 0 and c.keep(0.97):
            got = c.organ(name, side * 0.52, 0.22, 0.09 + 0.09 * kid, 0.12 + 0.12 * kid, 150, side * 0.45,
                          wob=0.06)
            if got is not None:
                _kidney_medulla(c, name, *got)
                if lesion_prob > 0 and c.keep(lesion_prob):
                    _lesion(c, name, "kidney_cyst", 0.03, 0.06, 2)
    if lesion_prob > 0 and liver > 0.3 and c.keep(lesion_prob):
        _lesion(c, "liver", "liver_lesion", 0.06, 0.13, 62, rim=28, texture=9)  # near-isodense, faint rim
    if 0.5 < z < 0.97:
        t = (z - 0.5) / 0.47
        for side, name in ((-1, "psoas_right"), (1, "psoas_left")):
            c.organ(name, side * (0.25 + 0.25 * t), 0.22 - 0.25 * t, 0.06 + 0.07 * t, 0.06 + 0.06 * t, 52,
                    wob=0.06, jitter=0.015)
    if 0.86 < z and c.keep(0.95):
        b = _profile(z, 0.82, 1.1)
        c.organ("urinary_bladder", 0.0, -0.45, 0.14 + 0.18 * b, 0.12 + 0.14 * b, 8, wob=0.08)
    if 0.88 < z:
        c.hollow("rectum", 0.0, 0.22, 0.1, 0.09, gas=rng.uniform(0, 0.5), wob=0.12)


def _vessels(c: _Canvas) -> None:
    """Vessels."""
    z = c.z
    thorax = z < 0.3
    if z < 0.78:
        c.organ("aorta", 0.14 if thorax else 0.06, 0.0 if thorax else -0.02, 0.075, 0.075, 330, wob=0.02,
                jitter=0.015)
    if 0.3 < z < 0.78:
        c.organ("inferior_vena_cava", -0.16, -0.02, 0.08, 0.06, 230, 0.2, wob=0.05, jitter=0.015)
    if 0.78 < z < 0.93:
        t = (z - 0.78) / 0.15
        for side, name in ((-1, "iliac_artery_right"), (1, "iliac_artery_left")):
            c.organ(name, side * (0.1 + 0.25 * t), -0.02 - 0.05 * t, 0.045, 0.045, 330, wob=0.02,
                    jitter=0.015)


def _skeleton(c: _Canvas, lesion_prob: float) -> None:
    """Skeleton."""
    z = c.z
    pelvis = z > 0.78
    if z < 0.82:
        _vertebra(c, lesion_prob)
    if 0.8 < z < 0.96:
        s = 0.6 + 0.4 * _profile(z, 0.76, 1.0)
        c.bone("sacrum", 0.0, 0.5, 0.28 * s, 0.12 * s, wob=0.08)
    if pelvis:
        for side, name in ((-1, "hip_right"), (1, "hip_left")):
            if z < 0.91:
                c.bone(name, side * 0.62, 0.12, 0.36, 0.09, side * 1.0, wob=0.1, cortex=0.7)
            else:
                c.bone(name, side * 0.64, 0.12, 0.16, 0.25, side * 0.3, wob=0.1)
        if z > 0.92:
            for side, name in ((-1, "femur_right"), (1, "femur_left")):
                got = c.shape(side * 0.66 * c.ws, 0.0, 0.145, 0.145, 0.0, 0.0, scaled=False)
                if got is not None:
                    c.paint(got[0], got[1] < 1, 40, 0, within="body")  # joint space
                c.bone(name, side * 0.66, 0.0, 0.125, 0.125, wob=0.02, cortex=0.8)
    if z < 0.62:
        _ribs(c, z)


def _marrow(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Cancellous bone inside a cortical rim: ~380 HU with a coarse trabecular mottling."""
    tex = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), 1.2)
    return np.float32(380 + rng.normal(0, 30)) + tex * np.float32(180)


def _kidney_medulla(c: _Canvas, name: str, sl: tuple[slice, slice], t: np.ndarray) -> None:
    """Corticomedullary phase: darker medullary pyramids (wedges pointing at the sinus) inside the bright
    cortex, and a darker sinus at the centre. Image only: the kidney keeps one label."""
    rng = c.rng
    inside = c.lab[sl] == _id(name)
    ys, xs = np.nonzero(inside)
    if len(ys) < 50:
        return
    yy, xx = np.mgrid[0:inside.shape[0], 0:inside.shape[1]]
    phi = np.arctan2(yy - ys.mean(), xx - xs.mean())
    n = int(rng.integers(3, 6))
    wedge = np.cos(n * (phi - rng.uniform(0, 6.3))) > rng.uniform(-0.3, 0.0)
    pyramids = inside & wedge & (t > 0.25) & (t < rng.uniform(0.72, 0.8))
    c.paint(sl, pyramids, 35 + rng.normal(0, 4), None)
    c.paint(sl, inside & (t <= 0.25), 0 + rng.normal(0, 4), None)


def _spots(c: _Canvas, name: str, sl: tuple[slice, slice], n: int, r0: float, r1: float, hu: float) -> None:
    """n small round spots of intensity `hu` centred on random pixels of structure `name` (vessels in
    lung and liver); they change the image only, not the labels."""
    ys, xs = np.nonzero(c.lab[sl] == _id(name))
    if len(ys) == 0:
        return
    for _ in range(n):
        j = int(c.rng.integers(len(ys)))
        y, x = ys[j] + sl[0].start, xs[j] + sl[1].start
        dot = c.shape(float(c.U[y, x]), float(c.V[y, x]), c.rng.uniform(r0, r1), c.rng.uniform(r0, r1), 0.0, 0.0,
                      scaled=False)
        if dot is not None:
            dsl, dt = dot
            c.paint(dsl, (dt < 1) & (c.lab[dsl] == _id(name)), hu, None)


def _inner(c: _Canvas, name: str, frac: float) -> tuple[tuple[slice, slice], np.ndarray]:
    """The core of an already-painted structure: its pixels eroded to about `frac` of its size."""
    m = c.lab == _id(name)
    ys, xs = np.nonzero(m)
    if len(ys) == 0:
        return (slice(0, 1), slice(0, 1)), np.zeros((1, 1), bool)
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    local = m[sl]
    dist = ndimage.distance_transform_edt(np.pad(local, 1))[1:-1, 1:-1]
    return sl, dist > (1 - frac) * dist.max()


def _lesion(c: _Canvas, host: str, name: str, r0: float, r1: float, hu: float, rim: float = 0.0,
            texture: float = 0.0) -> None:
    """A lesion labelled `name` inside `host`. `rim` > 0 adds a faint enhancing ring (HU above `hu`) and
    `texture` a fine mottling (HU amplitude): with `hu` near the host's, only these tell it apart."""
    ys, xs = np.nonzero(c.lab == _id(host))
    if len(ys) < 300:
        return
    j = int(c.rng.integers(len(ys)))
    r = c.rng.uniform(r0, r1)
    got = c.shape(float(c.U[ys[j], xs[j]]), float(c.V[ys[j], xs[j]]), r, r * c.rng.uniform(0.75, 1.0),
                  c.rng.uniform(0, 3.1), 0.12, scaled=False)
    if got is not None:
        sl, t = got
        val = np.full(t.shape, hu + c.rng.normal(0, 5), np.float32)
        if texture > 0:
            val += ndimage.gaussian_filter(c.rng.standard_normal(t.shape).astype(np.float32), 1.5) * (
                np.float32(texture * 4))
        if rim > 0:
            val += np.float32(rim) * ((t > 0.82) & (t < 1))
        c.paint(sl, (t < 1) & (c.lab[sl] == _id(host)), val, _id(name), within="body")


def _segment_dist(x: np.ndarray, y: np.ndarray, x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
    """Distance of pixel centres (x, y) to the segment (x0, y0)-(x1, y1)."""
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((x - x0) * dx + (y - y0) * dy) / max(dx * dx + dy * dy, 1e-6), 0, 1)
    return np.hypot(x - x0 - t * dx, y - y0 - t * dy)


def _lung_vessels(c: _Canvas, name: str, side: int, sl: tuple[slice, slice]) -> None:
    """Pulmonary vessels: trees branching from the hilum (the lung's medial edge) out to the periphery,
    thick and bright centrally, thin and faint outside, plus a faint parenchymal mottling. Image only:
    the lung keeps one label."""
    rng, lid = c.rng, _id(name)
    inside = c.lab[sl] == lid
    ys, xs = np.nonzero(inside)
    if len(ys) < 200:
        return
    h = c.hu[sl]
    # Parenchyma: -860 HU with a soft mottling (gravity-dependent density posteriorly).
    mott = ndimage.gaussian_filter(rng.standard_normal(inside.shape).astype(np.float32), 2.0) * np.float32(60)
    h[inside] += mott[inside] + np.float32(40) * np.clip(c.V[sl][inside], 0, None)
    yy, xx = np.mgrid[0:inside.shape[0], 0:inside.shape[1]].astype(np.float32)
    # Hilum: the medial-most tenth of the lung, mid-height.
    u = c.U[sl][inside] * -side
    medial = u >= np.quantile(u, 0.9)
    hy, hx = float(ys[medial].mean()), float(xs[medial].mean())
    extent = float(np.hypot(ys.max() - ys.min(), xs.max() - xs.min()))
    thick = min(1.0, max(0.4, math.sqrt(len(ys)) / 120))  # thinner vessels in small lung sections
    lines = np.zeros(inside.shape, np.float32)  # vessel HU above the parenchyma, max over branches
    stack = []
    for _ in range(int(rng.integers(3, 5))):  # lobar trunks fanning laterally, up and down
        a = math.atan2(0.0, side) + rng.uniform(-1.4, 1.4)  # lateral is +x for the left lung
        stack.append((hx, hy, a, float(rng.uniform(0.22, 0.3)) * extent, float(rng.uniform(3.5, 5.0)) * thick, 0))
    while stack:
        x0, y0, a, length, w, depth = stack.pop()
        x1, y1 = x0 + length * math.cos(a), y0 + length * math.sin(a)
        lo_y, hi_y = max(0, int(min(y0, y1) - w - 1)), min(inside.shape[0], int(max(y0, y1) + w + 2))
        lo_x, hi_x = max(0, int(min(x0, x1) - w - 1)), min(inside.shape[1], int(max(x0, x1) + w + 2))
        if lo_y < hi_y and lo_x < hi_x:
            box = (slice(lo_y, hi_y), slice(lo_x, hi_x))
            d = _segment_dist(xx[box], yy[box], x0, y0, x1, y1)
            # Partial volume: thin vessels are fainter.
            val = np.where(d < w / 2, np.float32(860 + rng.uniform(-40, 40)) * min(1.0, w / 3.0), 0)
            np.maximum(lines[box], val, out=lines[box])
        if depth < 3 and w > 1.2:
            for turn in (-1, 1):
                stack.append((x1, y1, a + turn * rng.uniform(0.25, 0.6), length * rng.uniform(0.6, 0.8),
                              w * 0.7, depth + 1))
    h[inside] += lines[inside]


def _vertebra(c: _Canvas, lesion_prob: float) -> None:
    rng = c.rng
    vy = 0.24 if c.z >= 0.3 else 0.3
    body = c.bone("vertebra", 0.0, vy, 0.17, 0.16, wob=0.03)
    arch = c.shape(0.0, vy + 0.25, 0.13, 0.12, 0.0, 0.03)
    if arch is not None:
        c.paint(arch[0], arch[1] < 1, 600, _id("vertebra"), within="body")
    spin = c.shape(rng.normal(0, 0.01), vy + 0.4, 0.025, 0.13, rng.normal(0, 0.05), 0.05)
    if spin is not None:
        c.paint(spin[0], spin[1] < 1, 550, _id("vertebra"), within="body")
    for side in (-1, 1):
        tp = c.shape(side * 0.18, vy + 0.2, 0.09, 0.03, side * 0.3, 0.08)
        if tp is not None:
            c.paint(tp[0], tp[1] < 1, 500, _id("vertebra"), within="body")
    canal = c.shape(0.0, vy + 0.25, 0.075, 0.065, 0.0, 0.02)
    if canal is not None:
        c.paint(canal[0], canal[1] < 1, 12, 0, within="body")
    if c.z < 0.7:
        c.organ("spinal_cord", 0.0, vy + 0.25, 0.045, 0.035, 38, wob=0.02, within="body", jitter=0.005)
    if lesion_prob > 0 and body is not None and rng.random() < 0.7 * lesion_prob:
        _lesion(c, "vertebra", "bone_metastasis", 0.04, 0.07, 60)


def _ribs(c: _Canvas, z: float) -> None:
    """Rib cross-sections: short bright arcs just inside the muscle wall."""
    rng = c.rng
    band = np.flatnonzero((c.cavity_r.ravel() > 0.85) & (c.cavity_r.ravel() < 1.1) & c.body.ravel())
    th = c.theta.ravel()[band]
    r = c.cavity_r.ravel()[band]
    hu, lab = c.hu.reshape(-1), c.lab.reshape(-1)
    for side, name in ((-1, "ribs_right"), (1, "ribs_left")):
        # Angles from the posterior midline (pi/2) towards this side; the patient's right is the image's left.
        if z < 0.3:
            n = int(rng.integers(4, 7))
            starts = np.sort(rng.uniform(0.45, 2.6, n))
        else:
            n = int(rng.integers(0, 4) * (1.0 - (z - 0.3) / 0.32) + 0.5)
            starts = np.sort(rng.uniform(1.0, 2.3, n))
        lid = _id(name)
        for a0 in starts:
            length = rng.uniform(0.15, 0.45)
            ang0 = math.pi / 2 - side * a0
            d = -side * ((th - ang0 + math.pi) % (2 * math.pi) - math.pi)
            along = (d >= 0) & (d <= length)
            rr = rng.uniform(0.93, 1.0)
            w = rng.uniform(0.03, 0.045)
            dist = np.abs(r - rr)
            seg = band[along & (dist < w)]
            hu[seg] = 900
            lab[seg] = lid
            hu[band[along & (dist < w * 0.4)]] = 420


def generate_slice(rng: np.random.Generator, level: float | None = None, lesion_prob: float = 0.0
                   ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic axial CT slice and its full semantic label map (ids as in STRUCTURES).

    `level` picks the axial position: 0 = upper thorax, ~0.4 upper abdomen, ~0.7 lower abdomen, 1 = hips
    (drawn from `rng` when None). `lesion_prob` > 0 draws the test-only classes (lesions), each with about
    that probability when its host organ is visible.
    """
    z = float(rng.uniform(0, 1)) if level is None else float(level)
    c = _Canvas(rng, z)
    _draw(c, lesion_prob)
    gray = (c.hu + 1000) * np.float32(255 / 2000)
    gray = ndimage.gaussian_filter(gray, 0.9)
    gray += _smooth_field(rng, 20, 1.2) * (gray > 30)
    noise = rng.standard_normal((SIZE, SIZE)).astype(np.float32) * np.float32(1.3)
    gray += noise * (gray > 8)  # air stays black, as in the real scans
    image = np.clip(np.rint(gray), 0, 255).astype(np.uint8)
    return image, c.lab

