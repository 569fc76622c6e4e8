"""Superpixel pseudo-labels restricted to the body: Felzenszwalb-Huttenlocher graph segmentation.

Used by `fsct shard --superpixels` for train and unlabeled slices; superpixel episodes (after SSL-ALPNet)
treat each segment as a structure, so the 1600 unlabelled slices give training tasks too.

Felzenszwalb is implemented here with numpy/scipy (no scikit-image): the image is averaged down to
WORK_SIZE (4x fewer pixels: the union-find loop is the cost), smoothed, its 8-neighbour edges inside the
body are sorted by intensity difference and merged with the paper's criterion
`w <= min(Int(A) + k/|A|, Int(B) + k/|B|)`; then segments under `min_size` are merged into a neighbour,
then the smallest ones until at most 255 remain, and labels are upsampled (nearest) to 512x512.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage, sparse
from scipy.sparse import csgraph

SIZE = 512
WORK_SIZE = 256
MAX_SEGMENTS = 255
BODY_THRESHOLD = 60  # uint8 after the -1000..1000 HU window: about -530 HU, between air and fat


def body_mask(image: np.ndarray, threshold: int = BODY_THRESHOLD, opening: int = 2) -> np.ndarray:
    """The patient: pixels above the air threshold, opened `opening` times (drops the table and thin
    clothing), the largest connected component, holes filled (lungs and bowel gas are inside the body)."""
    fg = image > threshold
    fg = ndimage.binary_opening(fg, structure=np.ones((3, 3), bool), iterations=opening)
    lab, n = ndimage.label(fg)
    if n == 0:
        return np.zeros(image.shape, bool)
    sizes = np.bincount(lab.ravel())
    sizes[0] = 0
    return ndimage.binary_fill_holes(lab == int(sizes.argmax()))


def _edges(smooth: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """8-neighbour edges (each once) between mask pixels: endpoints as flat indices, weights."""
    h, w = smooth.shape
    idx = np.arange(h * w).reshape(h, w)
    a_list, b_list, w_list = [], [], []
    for dy, dx in ((0, 1), (1, 0), (1, 1), (1, -1)):
        ys = slice(0, h - dy)
        xs = slice(max(0, -dx), w - max(0, dx))
        ys2 = slice(dy, h)
        xs2 = slice(max(0, dx), w - max(0, -dx) if dx < 0 else w)
        ok = mask[ys, xs] & mask[ys2, xs2]
        a_list.append(idx[ys, xs][ok])
        b_list.append(idx[ys2, xs2][ok])
        w_list.append(np.abs(smooth[ys, xs][ok] - smooth[ys2, xs2][ok]))
    return np.concatenate(a_list), np.concatenate(b_list), np.concatenate(w_list)


def felzenszwalb(image: np.ndarray, mask: np.ndarray, scale: float = 100.0, sigma: float = 0.8,
                 min_size: int = 20, max_segments: int = MAX_SEGMENTS, flat: float = 1.0) -> np.ndarray:
    """Graph-based segmentation of the `mask` pixels of a 2-D image: int32 labels, 0 outside the mask,
    1..n (n <= max_segments) inside; every mask pixel gets a segment.

    Edges of weight <= `flat` (intensity units; about half of a CT body's edges) are merged in bulk by
    connected components first: Felzenszwalb takes them first anyway and accepts them while
    k/|C| >= flat, so this changes only very large flat regions and makes the Python loop ~3x shorter."""
    smooth = image.astype(np.float32)
    if sigma > 0:
        smooth = ndimage.gaussian_filter(smooth, sigma)
    a, b, w = _edges(smooth, mask)
    n = image.size
    low = w <= flat
    graph = sparse.coo_matrix((np.ones(int(low.sum()), np.int8), (a[low], b[low])), shape=(n, n))
    _, comp = csgraph.connected_components(graph, directed=False)
    size_arr = np.bincount(comp, minlength=n)
    internal = np.zeros(n, np.float32)
    np.maximum.at(internal, comp[a[low]], w[low])
    # Components are named by their index in `comp`; union-find runs over those names.
    keep = ~low & (comp[a] != comp[b])
    a, b, w = comp[a[keep]], comp[b[keep]], w[keep]
    order = np.argsort(w, kind="stable")
    a, b, w = a[order].tolist(), b[order].tolist(), w[order].tolist()
    parent = list(range(n))
    size = size_arr.tolist()
    thresh = (internal + scale / np.maximum(size_arr, 1)).tolist()
    # The union-find's find is written out inline here and below: a function call per edge costs ~30 %.
    for u, v, wt in zip(a, b, w, strict=True):
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        if u == v or wt > thresh[u] or wt > thresh[v]:
            continue
        if size[u] < size[v]:
            u, v = v, u
        parent[v] = u
        size[u] += size[v]
        thresh[u] = wt + scale / size[u]  # edges come sorted: wt is the new component's largest MST edge
    roots = _compress(parent)
    pix = roots[comp]  # pixel -> segment root
    # Small segments join their neighbour across the lowest-weight edge, in the same sorted order.
    e_a, e_b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    pix = _merge_small(roots, np.asarray(size, np.int64), e_a, e_b, min_size)[comp]
    labels = _relabel(pix.reshape(mask.shape), mask)
    n_seg = int(labels.max())
    while n_seg > max_segments:
        # Raise the size floor to the (n - max)th smallest segment: a pass removes at least that many.
        counts = np.sort(np.bincount(labels.ravel())[1:])
        floor = int(counts[n_seg - max_segments - 1]) + 1
        flat_lab = labels.ravel().astype(np.int64)
        seg_size = np.bincount(flat_lab)
        la, lb = flat_lab[comp_first(comp, e_a)], flat_lab[comp_first(comp, e_b)]
        merged = _merge_small(np.arange(len(seg_size)), seg_size, la, lb, floor)
        labels = _relabel(merged[labels], mask)
        if int(labels.max()) == n_seg:  # isolated pieces with no edge left to merge across
            labels = _keep_largest(labels, max_segments)
        n_seg = int(labels.max())
    return labels


def comp_first(comp: np.ndarray, names: np.ndarray) -> np.ndarray:
    """A pixel of each named prepass component (its first one), to read labels of component ids."""
    first = np.full(comp.max() + 1, -1, np.int64)
    first[comp[::-1]] = np.arange(len(comp) - 1, -1, -1)
    return first[names]


def _compress(parent: list[int]) -> np.ndarray:
    p = np.asarray(parent, dtype=np.int64)
    while True:  # full path compression, vectorised: roots are fixed points
        q = p[p]
        if np.array_equal(q, p):
            return p
        p = q


def _merge_small(roots: np.ndarray, size: np.ndarray, a: np.ndarray, b: np.ndarray,
                 min_size: int) -> np.ndarray:
    """Node -> root after merging every segment under `min_size` into a neighbour, edges in the given
    (sorted) order. Only edges between different segments with a small end are looped over."""
    ra, rb = roots[a], roots[b]
    seg_size = size  # valid at roots, the only places it is read
    cand = (ra != rb) & ((seg_size[ra] < min_size) | (seg_size[rb] < min_size))
    parent = np.arange(len(roots)).tolist()
    sz = seg_size.tolist()
    for u, v in zip(ra[cand].tolist(), rb[cand].tolist(), strict=True):
        while parent[u] != u:
            parent[u] = parent[parent[u]]
            u = parent[u]
        while parent[v] != v:
            parent[v] = parent[parent[v]]
            v = parent[v]
        if u != v and (sz[u] < min_size or sz[v] < min_size):
            if sz[u] < sz[v]:
                u, v = v, u
            parent[v] = u
            sz[u] += sz[v]
    return _compress(parent)[roots]


def _relabel(roots: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Segment names -> 1..n in raster order of first appearance; 0 outside the mask."""
    out = np.zeros(mask.shape, np.int32)
    _, first, inverse = np.unique(roots[mask], return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # raster order of first pixel: stable, readable ids
    out[mask] = rank[inverse.ravel()] + 1
    return out


def _keep_largest(labels: np.ndarray, k: int) -> np.ndarray:
    """Fallback when segments cannot be merged (disconnected body parts): keep the k-1 largest, pool the
    rest into one id."""
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    keep = np.argsort(-counts)[: k - 1]
    lut = np.full(len(counts), k, np.int32)
    lut[0] = 0
    lut[np.sort(keep)] = np.arange(1, len(keep) + 1)
    return lut[labels]


def superpixels(image: np.ndarray, scale: float = 30.0, sigma: float = 0.5, min_size: int = 20,
                work_size: int = WORK_SIZE) -> np.ndarray:
    """uint8 (512,512) CT slice -> uint8 (512,512) segments: 0 outside the body, 1..255 inside.

    `min_size` is in pixels at `work_size` (20 at 256: about 80 pixels at 512, above episodes' default
    min_pixels of 64, so most segments are usable ways)."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"expected a 2-D slice, got shape {image.shape}")
    h, w = image.shape
    body = body_mask(image)
    if not body.any():
        return np.zeros((h, w), np.uint8)
    f = h // work_size if h % work_size == 0 and w % work_size == 0 and h >= work_size else 1
    # Block means: the downsampled image; a block is body when most of it is.
    small = image.reshape(h // f, f, w // f, f).astype(np.float32).mean((1, 3))
    small_body = body.reshape(h // f, f, w // f, f).mean((1, 3)) >= 0.5
    labels = felzenszwalb(small, small_body, scale, sigma, min_size)
    full = np.repeat(np.repeat(labels, f, 0), f, 1) if f > 1 else labels
    out = np.where(body, full, 0)
    # Body pixels whose block fell outside the small mask take the nearest segment's id.
    missing = body & (out == 0)
    if missing.any() and out.any():
        near = ndimage.distance_transform_edt(out == 0, return_distances=False, return_indices=True)
        out[missing] = out[near[0][missing], near[1][missing]]
    return out.astype(np.uint8)
