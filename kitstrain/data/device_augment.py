"""Augmentation on the device: the workers only read a slice and cut a window around the
training patch with the margin the warp needs (`cut_side`, `cut_origin`), of which they
read only the rows that the sample's draw reaches (`reach_rows`); the warp, the
intensity changes and the noise run batched on the GPU right after the copy
(`augment_batch`).

The random parameters are drawn in the worker by `augment.draw`, from the same generator
and in the same order as the worker path (`augment.augment_slice`): patch origin, the
draw, then the noise seed when noise fired. So a seed fixes a run on either side, and a
resumed run replays the same draws. Both sides share the warp's arithmetic: the output
(row, col) -> source map of `augment.warp_matrix` about the patch's centre, bilinear taps
clamped within half a pixel of the slice (the slice's darkest value beyond), the label's
nearest tap by the same rule as the numba kernel (`>= 0.5` rounds up), so labels are only
moved, never blended. With the same draw, both sides give the same patch up to float32
rounding; the noise is the same on CPU torch (the same generator), another stream on CUDA.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from kitstrain.data.augment import AugmentConfig, AugmentDraw, draw, warp_matrix

__all__ = [
    "PARAMS",
    "augment_batch",
    "cut_origin",
    "cut_side",
    "draw_params",
    "matrices",
    "reach_rows",
]

MAX_CHANNELS = 17  # 1 + 2 x the largest --context

# One sample's draw and where its patch lies: what crosses from a worker with the batch
PARAMS = np.dtype(
    [
        ("top", np.int32),  # the patch's top-left on the slice
        ("left", np.int32),
        ("cut_top", np.int32),  # the cut's top-left on the slice (what the worker sends)
        ("cut_left", np.int32),
        ("flip_h", np.bool_),
        ("flip_w", np.bool_),
        ("angle", np.float64),
        ("zoom", np.float64),
        ("gain", np.float64),
        ("offset", np.float64),
        ("noise", np.float64),
        ("noise_seed", np.int64),
        # each channel's darkest value on the whole slice (what the warp shows beyond it);
        # NaN: the cut's own (only right where the cut is the whole slice, all of it read)
        ("fill", np.float32, (MAX_CHANNELS,)),
    ]
)


def _spread(cfg: AugmentConfig) -> float:
    """The largest (|cos| + |sin|) / zoom the config can draw: how far a patch's source
    reaches from its centre, per unit of half-side."""
    if not cfg.enabled:
        return 1.0
    a = math.radians(min(cfg.max_rotate_deg, 45.0)) if cfg.p_rotate > 0 else 0.0
    zoom = min(1.0, cfg.scale_range[0]) if cfg.p_scale > 0 else 1.0
    return (math.cos(a) + math.sin(a)) / zoom


def cut_side(patch: int, size: int, cfg: AugmentConfig) -> int:
    """The side of the window a worker cuts so that any draw's warp finds every tap inside
    it: the rotated and zoomed-out patch's reach, plus the bilinear tap and rounding; the
    whole slice where that is larger (nnU-Net's 2D ranges with half-side patches: the
    whole slice)."""
    return min(size, math.ceil((patch - 1) * _spread(cfg)) + 4)


def cut_origin(top: int, left: int, patch: int, side: int, size: int) -> tuple[int, int]:
    """Top-left of the `side` cut centred on the patch, moved inside the slice: what the
    warp can reach of the slice is then inside the cut."""

    def one(p: int) -> int:
        return min(max(round(p + (patch - 1) / 2 - (side - 1) / 2), 0), size - side)

    return one(top), one(left)


def reach_rows(
    params: np.ndarray, patch: int, size: int, side: int
) -> tuple[np.ndarray, np.ndarray]:
    """Rows `start:stop` of the slice that each sample's warp reads (`params`, PARAMS
    records): all that a worker must read of it. `cut_side` serves the farthest draw of a
    config; most draws reach little beyond the patch (without rotation or zoom, its rows
    and the bilinear tap's next one), and a row range of a chunk is one contiguous read.
    The patch's rows reach (|cos| + |sin|) / zoom of its half-side from its centre, flips
    aside; one row more each side covers the kernel's float32 rounding and floor, and the
    cut (which holds every tap) bounds it."""
    half = (patch - 1) / 2
    angle = params["angle"]
    reach = half * (np.abs(np.cos(angle)) + np.abs(np.sin(angle))) / params["zoom"]
    centre = params["top"] + half
    cut_top = params["cut_top"].astype(np.int64)
    start = np.maximum(np.floor(centre - reach).astype(np.int64) - 1, cut_top)
    stop = np.minimum(np.floor(centre + reach).astype(np.int64) + 3, cut_top + side)
    return np.maximum(start, 0), np.minimum(stop, size)


def draw_params(
    rng: np.random.Generator,
    cfg: AugmentConfig,
    top: int,
    left: int,
    patch: int,
    side: int,
    size: int,
) -> np.void:
    """One sample's parameters, drawn as `augment_slice` draws them (after the patch
    origin): the draw, then the noise seed where noise fired."""
    d = draw(rng, cfg)
    seed = int(rng.integers(2**62)) if d.noise > 0.0 else 0
    ct, cl = cut_origin(top, left, patch, side, size)
    out = np.zeros((), PARAMS)
    fill = np.full(MAX_CHANNELS, np.nan, np.float32)
    out[()] = (
        top,
        left,
        ct,
        cl,
        d.flip_h,
        d.flip_w,
        d.angle,
        d.zoom,
        d.gain,
        d.offset,
        d.noise,
        seed,
        fill,
    )
    return out[()]


def _as_draw(p: np.void) -> AugmentDraw:
    return AugmentDraw(
        bool(p["flip_h"]),
        bool(p["flip_w"]),
        float(p["angle"]),
        float(p["zoom"]),
        float(p["gain"]),
        float(p["offset"]),
        float(p["noise"]),
    )


def matrices(params: np.ndarray, patch: int) -> np.ndarray:
    """(B, 2, 3) output (row, col) -> slice (row, col) maps, as the worker path builds them."""
    out = np.empty((len(params), 2, 3), np.float64)
    for j, p in enumerate(params):
        m = warp_matrix((patch, patch), _as_draw(p))
        m[:, 2] += (float(p["top"]), float(p["left"]))
        out[j] = m
    return out


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    params: np.ndarray,
    patch: int,
    size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp, intensity and noise for a batch of cuts, on the cuts' device.

    `images` (B, C, S, S) float16/float32 and `labels` (B, S, S) uint8 are the workers'
    cuts (S = `cut_side`) of slices of `size`; `params` their `PARAMS` records. Returns
    float32 (B, C, patch, patch) images and uint8 (B, patch, patch) labels."""
    dev = images.device
    b, c, s, _ = images.shape
    m = torch.from_numpy(matrices(params, patch)).to(dev, torch.float32)
    cut = torch.from_numpy(
        np.stack([params["cut_top"], params["cut_left"]], 1).astype(np.float32)
    ).to(dev)
    # source point of every output pixel, in float32 as the numba kernel computes it
    r = torch.arange(patch, device=dev, dtype=torch.float32)
    qy = (m[:, 0, 0, None, None] * r[:, None] + m[:, 0, 2, None, None]) + m[
        :, 0, 1, None, None
    ] * r[None, :]
    qx = (m[:, 1, 0, None, None] * r[:, None] + m[:, 1, 2, None, None]) + m[
        :, 1, 1, None, None
    ] * r[None, :]
    inside = (qy >= -0.5) & (qy <= size - 0.5) & (qx >= -0.5) & (qx <= size - 0.5)
    qy = qy.clamp(0.0, size - 1.0)
    qx = qx.clamp(0.0, size - 1.0)
    y0 = qy.floor().clamp(max=size - 2)
    x0 = qx.floor().clamp(max=size - 2)
    fy = (qy - y0)[:, None]
    fx = (qx - x0)[:, None]
    # taps as offsets into each cut (the cut holds every tap the warp can reach)
    yi = (y0 - cut[:, 0, None, None]).long()
    xi = (x0 - cut[:, 1, None, None]).long()
    i00 = (yi * s + xi).reshape(b, 1, -1)
    src = images.reshape(b, c, s * s).float()

    def tap(offset: int) -> torch.Tensor:
        return src.gather(2, (i00 + offset).expand(b, c, -1)).reshape(b, c, patch, patch)

    v00, v01, v10, v11 = tap(0), tap(1), tap(s), tap(s + 1)
    top = v00 + (v01 - v00) * fx
    bot = v10 + (v11 - v10) * fx
    out = top + (bot - top) * fy
    # beyond the slice: its darkest value per channel (the cut's own, where it is the slice)
    given = np.array(params["fill"][:, :c], np.float32)
    fill = torch.from_numpy(given).to(dev)
    if np.isnan(given).any():
        fill = torch.where(torch.isnan(fill), src.amin(dim=2), fill)
    out = torch.where(inside[:, None], out, fill[:, :, None, None])
    near = i00 + (fy[:, 0] >= 0.5).long().reshape(b, 1, -1) * s
    near = near + (fx[:, 0] >= 0.5).long().reshape(b, 1, -1)
    lab = labels.reshape(b, 1, s * s).gather(2, near).reshape(b, patch, patch)
    lab = torch.where(inside, lab, torch.zeros((), dtype=lab.dtype, device=dev))

    gain = torch.from_numpy(params["gain"].astype(np.float32)).to(dev)
    offset = torch.from_numpy(params["offset"].astype(np.float32)).to(dev)
    if bool((params["gain"] != 1.0).any() or (params["offset"] != 0.0).any()):
        out = out * gain[:, None, None, None] + offset[:, None, None, None]
    for j in np.flatnonzero(params["noise"] > 0.0):
        # the worker path's generator and shape: the same noise on CPU torch
        g = torch.Generator(device=dev).manual_seed(int(params["noise_seed"][j]))
        noise = torch.randn((c, patch, patch), generator=g, device=dev)
        out[j].add_(noise, alpha=float(params["noise"][j]))
    return out, lab
