"""The built-in synthetic 5-component tire dataset: plausible half cross-sections that need no download.

    epure data synth --out data/synth --n 200 --seed 0

Every design is the left half (64 rows x 32 columns) of a mirror-symmetric section, with the tread at the top
and the symmetry axis just right of column 31. Its components are laid out around one reference curve, the
outer edge of the carcass, described in polar coordinates about a point on the axis at the widest row:

- ``group_nc`` (carcass): a band just inside the reference curve, from the axis over the shoulder down to the bead;
- ``group_km`` (crown belt): a band just outside it over the crown;
- ``tpc`` (tread cap): the rubber between the belt and the tread surface, down to the shoulder;
- ``fpu`` (flank): a thin band outside the lower side wall;
- ``bt`` (bead): a compact blob at the lower end of the carcass.

The reference curve and the tread surface come from a few *shared* parameters (section height and width, widest
row, shoulder squareness, crown depth, bead position), so each component says something about the others; each
component also has *private* parameters (its own thickness profile and extent, the bead's size and tilt, tread
shoulder) that mostly only it shows, so a model's private latents have something to learn. Components never overlap
(each pixel belongs to one material, as in the public toy set) and touch where they meet. Every returned design
is checked: each component is one non-empty 4-connected piece (a stray pixel cut off a thin band's end is
dropped), so is their union, and the section keeps a one-pixel margin inside the grid; designs that fail are
redrawn (a few percent).
"""

from __future__ import annotations

import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from scipy import ndimage

from epure.data.dimensions import measure_dimensions, union_of_components

log = logging.getLogger(__name__)

COMPONENTS = ("group_nc", "group_km", "bt", "fpu", "tpc")
ROWS, COLS = 64, 32
AXIS = float(COLS)  # the symmetry axis, in column units (pixel j spans [j, j + 1])
BATCH = 256  # designs drawn per batch: fixed, so the first k designs of a seed never depend on n

SHARED_PARAMETERS = ("height", "top", "half_width", "belly", "shoulder_exp", "sidewall_exp", "crown_depth",
                     "bead_position")
PRIVATE_PARAMETERS = {
    "group_nc": ("nc_thick_top", "nc_thick_bottom"),
    "group_km": ("km_thick", "km_end", "km_taper"),
    "bt": ("bt_rx", "bt_ry", "bt_tilt", "bt_shift"),
    "fpu": ("fpu_start", "fpu_end", "fpu_thick_top", "fpu_thick_bottom"),
    "tpc": ("tpc_end", "tpc_shoulder", "tpc_profile"),
}

# Pixel centres: y grows downward from the top row, d is the distance to the symmetry axis.
_Y = (np.arange(ROWS, dtype=np.float64) + 0.5)[:, None]
_D = AXIS - (np.arange(COLS, dtype=np.float64) + 0.5)[None, :]
_CROSS = np.zeros((3, 3, 3), dtype=bool)  # 4-connectivity within one design, never across designs
_CROSS[1] = ndimage.generate_binary_structure(2, 1)


def _draw_parameters(rng: np.random.Generator, m: int) -> dict[str, np.ndarray]:
    """Draw ``m`` designs' parameters; the draw order is fixed so a seed always gives the same designs."""
    u = rng.uniform
    p: dict[str, np.ndarray] = {}
    # shared geometry
    p["height"] = u(40.0, 61.0, m)  # tread top to bead bottom, pixels
    p["top"] = u(1.0, np.minimum(4.0, 62.5 - p["height"]))  # row of the tread surface on the axis
    p["half_width"] = u(16.5, 26.5, m)  # carcass outer edge at the widest row, from the axis
    p["belly"] = u(0.40, 0.55, m)  # widest row, as a fraction of the height
    p["shoulder_exp"] = u(2.0, 3.6, m)  # superellipse exponent of the crown: higher, squarer shoulder
    p["sidewall_exp"] = u(1.7, 2.5, m)  # same for the lower side wall: higher, fuller wall
    p["crown_depth"] = u(8.0, 11.5, m)  # tread surface to carcass edge on the axis
    p["bead_position"] = u(0.45, 0.70, m)  # bead distance from the axis, as a fraction of half_width
    # group_nc: thickness at the crown and at the bead
    p["nc_thick_top"] = u(2.8, 4.6, m)
    p["nc_thick_bottom"] = u(3.0, 5.2, m)
    # group_km: thickness, angular end (radians from the axis direction), thinning toward its edge
    p["km_thick"] = u(3.0, 4.8, m)
    p["km_end"] = u(0.80, 1.20, m)
    p["km_taper"] = u(0.0, 0.35, m)
    # bt: semi-axes, tilt, and slide along the carcass end
    p["bt_rx"] = u(2.6, 4.0, m)
    p["bt_ry"] = u(2.4, 3.6, m)
    p["bt_tilt"] = u(-0.6, 0.6, m)
    p["bt_shift"] = u(-0.5, 1.0, m)
    # fpu: angular extent (start near the widest row, end near the bead) and thickness at both ends
    p["fpu_start"] = u(-0.35, 0.25, m)  # offset from the widest row's direction, radians
    p["fpu_end"] = u(-0.05, 0.15, m)  # how far before the bead it stops, radians
    p["fpu_thick_top"] = u(2.2, 3.6, m)
    p["fpu_thick_bottom"] = u(1.8, 2.4, m)
    # tpc: angular end, thickness at the shoulder, profile exponent (how late the tread thins)
    p["tpc_end"] = u(0.0, 1.0, m)  # fraction of the way from the belt end to the widest row
    p["tpc_shoulder"] = u(2.8, 4.6, m)
    p["tpc_profile"] = u(1.5, 3.5, m)
    return p


def _superellipse(theta: np.ndarray, a: np.ndarray, b: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """Radius of the superellipse |x/a|^e + |y/b|^e = 1 in direction ``theta`` (0 = up, pi/2 = outward)."""
    s = np.abs(np.sin(theta)) / a
    c = np.abs(np.cos(theta)) / b
    return (s**exponent + c**exponent) ** (-1.0 / exponent)


def _bead(col: dict[str, np.ndarray], yc, a, b_low, e_low, theta_bead) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bead: a tilted ellipse on the carcass's mid-line at its lower end, slid along the wall by bt_shift
    pixels; its mask, and the angle and radius of its centre (where the carcass and the flank end)."""
    r_end = _superellipse(theta_bead, a, b_low, e_low)
    theta_bt = theta_bead + col["bt_shift"] / r_end
    r_bt = _superellipse(theta_bt, a, b_low, e_low) - 2.0
    cd = r_bt * np.sin(theta_bt)
    cy = yc - r_bt * np.cos(theta_bt)
    cos_t, sin_t = np.cos(col["bt_tilt"]), np.sin(col["bt_tilt"])
    u = (_D - cd) * cos_t + (_Y - cy) * sin_t
    v = -(_D - cd) * sin_t + (_Y - cy) * cos_t
    return (u / col["bt_rx"]) ** 2 + (v / col["bt_ry"]) ** 2 <= 1.0, theta_bt, r_bt


def _rasterise(p: dict[str, np.ndarray]) -> np.ndarray:
    """Boolean masks [m, 5, 64, 32] of the designs ``p``, evaluated on the pixel grid for all at once."""
    col = {k: v[:, None, None] for k, v in p.items()}
    top, height, a = col["top"], col["height"], col["half_width"]
    yc = top + col["belly"] * height  # polar centre: on the axis, at the widest row
    bottom = top + height
    b_up = yc - top - col["crown_depth"]  # carcass outer edge on the axis sits crown_depth under the tread
    # the lower branch passes through the carcass end, a bead radius above the section bottom
    d_end = col["bead_position"] * a
    y_end = bottom - 2.5
    e_low = col["sidewall_exp"]
    b_low = (y_end - yc) / (1.0 - (d_end / a) ** e_low) ** (1.0 / e_low)
    theta_bead = np.arctan2(d_end, yc - y_end)  # > pi/2: below the widest row

    dy = yc - _Y
    rho = np.hypot(_D, dy)
    theta = np.arctan2(_D, dy)  # 0: straight up, pi/2: outward, pi: straight down
    upper = theta <= np.pi / 2  # crown and shoulder above the widest row, side wall below it
    ref = _superellipse(theta, a, np.where(upper, b_up, b_low), np.where(upper, col["shoulder_exp"], e_low))
    s = rho - ref  # signed radial distance to the carcass outer edge, positive outward

    bt, theta_bt, r_bt = _bead(col, yc, a, b_low, e_low, theta_bead)

    # carcass: inside the reference curve, thickness blended from crown to bead, ending in the bead
    along = np.clip(theta / theta_bead, 0.0, 1.0)
    t_nc = col["nc_thick_top"] + (col["nc_thick_bottom"] - col["nc_thick_top"]) * along
    nc = (s <= 0.0) & (s >= -t_nc) & (theta <= theta_bt)

    # belt: outside the carcass over the crown, thinning toward its edge
    km_end = col["km_end"]
    t_km = col["km_thick"] * (1.0 - col["km_taper"] * np.clip(theta / km_end, 0.0, 1.0) ** 2)
    km = (s > 0.0) & (s <= t_km) & (theta <= km_end)

    # tread cap: from the carcass to the tread surface, thinning from crown_depth to tpc_shoulder
    tpc_end = km_end + 0.15 + col["tpc_end"] * np.maximum(np.pi / 2 - km_end - 0.15, 0.0)
    frac = np.clip(theta / tpc_end, 0.0, 1.0) ** col["tpc_profile"]
    surface = col["crown_depth"] - (col["crown_depth"] - col["tpc_shoulder"]) * frac
    tpc = (s > 0.0) & (s <= surface) & (theta <= tpc_end)

    # flank: outside the lower side wall, from about the widest row down to where the bead begins, tapering
    f0 = np.pi / 2 + col["fpu_start"]
    f1 = theta_bt - 0.7 * np.maximum(col["bt_rx"], col["bt_ry"]) / r_bt - col["fpu_end"]
    t_f = col["fpu_thick_top"] + (col["fpu_thick_bottom"] - col["fpu_thick_top"]) * np.clip(
        (theta - f0) / (f1 - f0), 0.0, 1.0)
    fpu = (s > 0.0) & (s <= t_f) & (theta >= f0) & (theta <= f1)

    # one material per pixel: the bead wins over the carcass, the carcass over the rubbers, the belt over the tread
    nc &= ~bt
    km &= ~(bt | nc)
    tpc &= ~(bt | nc | km)
    fpu &= ~(bt | nc | km | tpc)
    layers = {"group_nc": nc, "group_km": km, "bt": bt, "fpu": fpu, "tpc": tpc}
    return np.stack([_keep_largest(layers[name]) for name in COMPONENTS], axis=1)


def _pieces(masks: np.ndarray) -> np.ndarray:
    """Number of 4-connected pieces in each of ``masks`` [m, H, W], from one labelling of the whole stack."""
    labels, total = ndimage.label(masks, structure=_CROSS)
    if total == 0:
        return np.zeros(len(masks), dtype=np.int64)
    flat = labels.reshape(len(masks), -1)
    # labels are numbered in raster order, so each design's labels form one contiguous range
    high = flat.max(axis=1)
    low = np.where(flat > 0, flat, np.iinfo(flat.dtype).max).min(axis=1)
    return np.where(high > 0, high - low + 1, 0)


def _keep_largest(masks: np.ndarray) -> np.ndarray:
    """``masks`` [m, H, W] with only each design's largest 4-connected piece: rasterising a thin band's ends
    can leave a pixel or two cut off, which no real drawing has."""
    labels, total = ndimage.label(masks, structure=_CROSS)
    if total == 0:
        return masks
    flat = labels.reshape(len(masks), -1)
    # labels are numbered in raster order, so each design's labels form one contiguous range
    last = np.maximum.accumulate(flat.max(axis=1))
    label = np.arange(1, total + 1)
    owner = np.searchsorted(last, label, side="left")
    sizes = np.bincount(flat.ravel(), minlength=total + 1)[1:].astype(np.int64)
    best = np.zeros(len(masks), dtype=np.int64)  # per design: size * (total + 1) + label of its largest piece
    np.maximum.at(best, owner, sizes * (total + 1) + label)
    keep = best % (total + 1)
    return (labels == keep[:, None, None]) & (keep[:, None, None] > 0)


def _valid(masks: np.ndarray) -> np.ndarray:
    """Which designs of ``masks`` [m, 5, H, W] are usable: no tiny component, a connected union, a margin."""
    ok = (masks.sum(axis=(2, 3)) >= 6).all(axis=1)  # each component is one piece already (_keep_largest)
    union = masks.any(axis=1)
    ok &= _pieces(union) == 1
    rows, cols = union.any(axis=2), union.any(axis=1)
    ok &= ~rows[:, 0] & ~rows[:, -1] & ~cols[:, 0]
    return ok


def generate_sections(n: int, seed: int) -> tuple[np.ndarray, pd.DataFrame]:
    """``n`` synthetic designs for ``seed``: uint8 masks [n, 5, 64, 32] (0/255, components in ``COMPONENTS``
    order) and a DataFrame of each design's shared and private parameters.

    Same seed, same designs; the first k designs of a seed are the same whatever ``n`` is.
    """
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = np.random.default_rng(seed)
    kept_masks: list[np.ndarray] = []
    kept_params: list[pd.DataFrame] = []
    have = drawn = 0
    while have < n:
        params = _draw_parameters(rng, BATCH)
        masks = _rasterise(params)
        ok = _valid(masks)
        drawn += BATCH
        take = np.flatnonzero(ok)[: n - have]
        kept_masks.append(masks[take])
        kept_params.append(pd.DataFrame({k: v[take] for k, v in params.items()}))
        have += len(take)
        if drawn > 50 * max(n, BATCH) and have < n:  # a broken parameter range, not bad luck
            raise RuntimeError(f"synthetic generator keeps only {have} of {drawn} drawn designs")
    if drawn:
        log.debug("synthetic designs: kept %d of %d drawn", have, drawn)
    masks = np.concatenate(kept_masks) if kept_masks else np.zeros((0, len(COMPONENTS), ROWS, COLS), dtype=bool)
    table = pd.concat(kept_params, ignore_index=True) if kept_params else pd.DataFrame(
        columns=list(SHARED_PARAMETERS) + [c for cols in PRIVATE_PARAMETERS.values() for c in cols])
    return masks.astype(np.uint8) * np.uint8(255), table


def _split(n: int, seed: int, test_fraction: float) -> np.ndarray:
    """Boolean train flags: a deterministic random ``test_fraction`` of the designs go to test (at least one
    of each split when there are two designs or more and the fraction is strictly between 0 and 1)."""
    n_test = int(round(n * test_fraction))
    if n >= 2 and 0.0 < test_fraction < 1.0:
        n_test = min(max(n_test, 1), n - 1)
    train = np.ones(n, dtype=bool)
    train[np.random.default_rng([seed, 1]).permutation(n)[:n_test]] = False
    return train


def dropped_components(n: int, m: int, probability: float, seed: int) -> np.ndarray:
    """Which components of ``n`` designs are left out -> bool [n, m]: each design keeps one component chosen at
    random, and each of its others is dropped with ``probability`` (its own stream: the designs stay the same)."""
    rng = np.random.default_rng([seed, 2])
    keep = rng.integers(0, m, n)
    drop = rng.random((n, m)) < probability
    drop[np.arange(n), keep] = False
    return drop


def write_synthetic_dataset(out_dir: str | Path, n: int, seed: int, test_fraction: float = 0.2,
                            missing: float = 0.0) -> Path:
    """Write ``n`` synthetic designs to ``out_dir`` in the users' format and return ``out_dir``.

    Layout: ``out_dir/{train,test}/{component}/synth_XXXXX_{component}.png`` (mode L, 0/255) and
    ``out_dir/dimensions.csv`` (``matching,width_px,height_px,train``), the dimensions measured on the union of
    the components exactly as for the users' data. Everything is built in a hidden sibling folder and renamed
    into place, so a reader never sees a half-written dataset. ``missing`` > 0 leaves out PNGs (see
    ``dropped_components``) for data with incomplete designs; the dimensions stay those of the whole design.
    """
    out_dir = Path(out_dir)
    if not 0.0 <= test_fraction <= 1.0:
        raise ValueError(f"test_fraction must lie in [0, 1], got {test_fraction}")
    if not 0.0 <= missing <= 1.0:
        raise ValueError(f"missing must lie in [0, 1], got {missing}")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir} already exists and is not empty; choose a new folder or remove it")

    masks, _ = generate_sections(n, seed)
    width, height = measure_dimensions(union_of_components(masks))
    ids = [f"synth_{i:05d}" for i in range(n)]
    train = _split(n, seed, test_fraction)
    dropped = dropped_components(n, len(COMPONENTS), missing, seed)

    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    if tmp.exists():  # left by a crashed run that had our pid
        shutil.rmtree(tmp)
    try:
        for split in ("train", "test"):
            for component in COMPONENTS:
                (tmp / split / component).mkdir(parents=True)

        def write_one(i: int) -> None:
            split = "train" if train[i] else "test"
            for c, component in enumerate(COMPONENTS):
                if dropped[i, c]:
                    continue
                Image.fromarray(masks[i, c], mode="L").save(tmp / split / component / f"{ids[i]}_{component}.png")

        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            list(pool.map(write_one, range(n), chunksize=64))
        pd.DataFrame({"matching": ids, "width_px": width, "height_px": height, "train": train}).to_csv(
            tmp / "dimensions.csv", index=False)
        if out_dir.exists():  # empty, checked above
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
