"""Synth phantoms: the pixels. A noise-free HU volume of a chest CT study and its lung- and
soft-tissue-kernel reconstructions as stored values, chest radiographs (PA and lateral) as stored
values, and the text-like pixels of a dose screen; all from a study's plan and a NumPy generator."""

from __future__ import annotations

import numpy as np

from pipeline.synth.planning import (
    CTGeometry,
    Lesion,
    PatientPlan,
    ProjGeometry,
    StudyPlan,
    in_ct_lung,
    proj_lung_field,
)
from pipeline.synth.sites import Site

_F32 = np.float32


def _kernel(sigma: float, n: int) -> np.ndarray:
    radius = max(1, min(int(np.ceil(3 * sigma)), n - 1))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    return (k / k.sum()).astype(_F32)


def _gaussian(img: np.ndarray, sigma) -> np.ndarray:
    """Separable Gaussian filter with reflected edges; ``sigma`` in pixels per axis (0: not along it)."""
    sig = np.broadcast_to(np.asarray(sigma, dtype=float), (img.ndim,))
    out = img.astype(_F32, copy=False)
    for ax, s in enumerate(sig):
        n = out.shape[ax]
        if s <= 0 or n < 2:
            continue
        k = _kernel(float(s), n)
        rad = k.size // 2
        pads = [(0, 0)] * out.ndim
        pads[ax] = (rad, rad)
        padded = np.moveaxis(np.pad(out, pads, mode="reflect"), ax, 0)
        acc = k[0] * padded[0:n]
        for i in range(1, k.size):
            acc += k[i] * padded[i:i + n]
        out = np.moveaxis(acc, 0, ax)
    return out


def _noise_gain(sigma, shape) -> float:
    """Standard deviation of white unit noise after :func:`_gaussian` with ``sigma``."""
    gain = 1.0
    for s, n in zip(np.broadcast_to(np.asarray(sigma, dtype=float), (len(shape),)), shape):
        if s > 0 and n >= 2:
            gain *= float(np.sqrt(np.sum(_kernel(float(s), n).astype(float) ** 2)))
    return gain


def _smooth_noise(r: np.random.Generator, shape, sigma) -> np.ndarray:
    """Gaussian-correlated noise with unit standard deviation."""
    return _gaussian(r.standard_normal(shape, dtype=_F32), sigma) / _F32(_noise_gain(sigma, shape))


def _vessel_tree(r: np.random.Generator, roots, inside, step: float, generations: int = 6) -> np.ndarray:
    """Sample points of a branching vessel tree, shape (points, 5): x, y, z, radius (mm) and the
    length (mm) each point stands for. ``roots``: (hilum position (3,), direction (3,), radius mm);
    each segment forks in two thinner, slightly diverging children and bends a little; ``inside(points)``
    (points (k, 3) -> bool (k,)) keeps the tree in the lung: a branch ends where it leaves it."""
    pos = np.array([p for p, _, _ in roots], dtype=float)
    dirs = np.array([d for _, d, _ in roots], dtype=float)
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    rad = np.array([q for _, _, q in roots], dtype=float)
    hila = pos.copy()
    chunks = []
    for gen in range(generations):
        if not len(pos):
            break
        length = rad * r.uniform(5.0, 9.0, size=rad.shape)
        n_steps = np.maximum(2, np.ceil(length / step).astype(int))
        most = int(n_steps.max())
        t = (np.arange(most) + 0.5)[None, :] / n_steps[:, None]  # (branch, step)
        bend = r.standard_normal(dirs.shape) * 0.25
        pts = pos[:, None, :] + length[:, None, None] * (t[..., None] * dirs[:, None, :]
                                                         + 0.5 * t[..., None] ** 2 * bend[:, None, :])
        valid = t < 1.0
        keep = valid & inside(pts.reshape(-1, 3)).reshape(valid.shape)
        # a branch stops at the first point outside the lung
        keep &= np.cumprod(keep | ~valid, axis=1).astype(bool)
        taper = rad[:, None] * (1.0 - 0.15 * t)
        seg = np.concatenate([pts, taper[..., None], np.broadcast_to((length / n_steps)[:, None, None],
                                                                         taper.shape + (1,))], axis=-1)
        chunks.append(seg[keep])
        alive = keep[np.arange(len(pos)), n_steps - 1]  # reached its end inside the lung
        end = pos + length[:, None] * (dirs + 0.5 * bend)
        mid_dir = dirs + bend
        mid_dir /= np.linalg.norm(mid_dir, axis=1, keepdims=True)
        pos, mid_dir, rad, hila = end[alive], mid_dir[alive], rad[alive], hila[alive]
        if not len(pos):
            break
        # two children: rotate about a random axis perpendicular to the parent, away from the hilum
        outward = pos - hila
        outward /= np.maximum(np.linalg.norm(outward, axis=1, keepdims=True), 1e-6)
        perp = np.cross(mid_dir, r.standard_normal(mid_dir.shape))
        perp /= np.maximum(np.linalg.norm(perp, axis=1, keepdims=True), 1e-6)
        angle = r.uniform(0.35, 0.7, size=(len(pos), 1))
        kids = [mid_dir * np.cos(angle) + sign * perp * np.sin(angle) + 0.25 * outward for sign in (1.0, -1.0)]
        dirs = np.concatenate(kids)
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
        share = r.uniform(0.62, 0.82, size=len(pos))  # uneven fork; Murray's law: r^3 = r1^3 + r2^3
        rad = np.concatenate([rad * share, rad * np.cbrt(1.0 - share ** 3)])
        pos, hila = np.concatenate([pos, pos]), np.concatenate([hila, hila])
        live = rad > 0.4
        pos, dirs, rad, hila = pos[live], dirs[live], rad[live], hila[live]
    return np.concatenate(chunks) if chunks else np.zeros((0, 5))


def _splat(shape, coords: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Linear splatting: add ``weights`` at fractional grid ``coords`` (points, ndim) into an array of
    ``shape`` (float32); points outside the grid are dropped."""
    ndim = len(shape)
    base = np.floor(coords).astype(np.int64)
    frac = coords - base
    out = np.zeros(int(np.prod(shape)), dtype=float)
    for corner in range(1 << ndim):
        idx = base.copy()
        w = weights.astype(float).copy()
        for ax in range(ndim):
            bit = (corner >> ax) & 1
            idx[:, ax] += bit
            w *= frac[:, ax] if bit else 1.0 - frac[:, ax]
        ok = np.all((idx >= 0) & (idx < np.asarray(shape)), axis=1)
        flat = np.ravel_multi_index(tuple(idx[ok].T), shape)
        out += np.bincount(flat, weights=w[ok], minlength=out.size)
    return out.reshape(shape).astype(_F32)


def _ct_grid(g: CTGeometry, site: Site):
    m, ps, dz = site.ct_matrix, site.ct_fov / site.ct_matrix, site.ct_spacing
    x = ((np.arange(m, dtype=_F32) - (m - 1) / 2) * ps)[None, None, :]
    y = ((np.arange(m, dtype=_F32) - (m - 1) / 2) * ps)[None, :, None]
    z = ((np.arange(g.n_slices, dtype=_F32) - (g.n_slices - 1) / 2) * dz)[:, None, None]
    return x, y, z


def _ct_vessel_fraction(g: CTGeometry, site: Site, r: np.random.Generator, lung: np.ndarray) -> np.ndarray:
    """Volume fraction (0-1) of pulmonary vessels in each voxel of the slab, shape (slices, rows, cols):
    a branching tree from each hilum (:func:`_vessel_tree`), splatted with its true volume (pi r^2 per
    mm), so vessels thinner than a voxel show with partial-volume contrast and vessels crossing the
    slice show as dots."""
    n, m, ps, dz = g.n_slices, site.ct_matrix, site.ct_fov / site.ct_matrix, site.ct_spacing
    roots = []
    for cx, cy, ax, ay in g.lungs:
        side = np.sign(cx)
        hilum = np.array([cx - side * 0.55 * ax, cy + r.uniform(-0.1, 0.15) * ay, r.uniform(-20, 20)])
        for k in range(12):  # lobar and segmental trunks, spread over the directions away from the mediastinum
            direction = r.standard_normal(3)
            direction[0] = side * (abs(direction[0]) + 0.3)
            roots.append((hilum, direction, r.uniform(3.0, 5.0)))

    def inside(p: np.ndarray) -> np.ndarray:
        return in_ct_lung(g, p[:, 0], p[:, 1], p[:, 2], margin=-2.0) | (np.abs(p[:, 0]) < g.mediastinum[1] + 30.0)

    tree = _vessel_tree(r, roots, inside, step=min(ps, dz) / 2, generations=7)
    coords = np.column_stack([tree[:, 2] / dz + (n - 1) / 2, tree[:, 1] / ps + (m - 1) / 2,
                              tree[:, 0] / ps + (m - 1) / 2])
    volume = np.pi * tree[:, 3] ** 2 * tree[:, 4] / (ps * ps * dz)
    frac = _gaussian(_splat((n, m, m), coords, volume), (0.0, 0.45, 0.45))
    return np.clip(frac, 0.0, 1.0) * lung


def ct_hu_volume(st: StudyPlan, site: Site, r: np.random.Generator) -> np.ndarray:
    """Noise-free HU volume of a CT study, slices in ascending position order, shape (slices, rows,
    cols), float32. Tissue boundaries are partial-volume (anti-aliased); the lungs have a fine
    correlated parenchymal texture, a gravity gradient and a branching vessel tree."""
    g = st.ct
    assert g is not None
    n, m, ps, dz = g.n_slices, site.ct_matrix, site.ct_fov / site.ct_matrix, site.ct_spacing
    x, y, z = _ct_grid(g, site)
    a, b, yc, fat = g.body
    scale = 1.0 + 0.035 * np.sin(z / 70.0 + g.body_phase)
    xn, yn = x / (a * scale), (y - yc) / (b * scale)
    rho = np.sqrt(xn * xn + yn * yn)
    # body outline: an ellipse in front, a flatter superellipse at the back (the patient lies on the table)
    power = 2.0 + 0.9 * np.clip(yn * 3.0, 0.0, 1.0)
    rho_body = (np.abs(xn) ** power + np.abs(yn) ** power) ** (1.0 / power)
    body = np.clip((1.0 - rho_body) * min(a, b) / ps + 0.5, 0.0, 1.0)  # anti-aliased skin edge
    tex = _smooth_noise(r, (m, m), 2.0)  # soft-tissue texture (slowly varying, shared by the slices)
    fine = _smooth_noise(r, (n, m, m), (0.0, 0.6, 0.6))  # fine grain of muscle and fat
    soft = 45.0 + 8.0 * tex + 5.0 * fine  # muscle and mediastinal soft tissue
    soft = np.where(rho_body > 1.0 - fat / min(a, b), -100.0 + 12.0 * np.roll(tex, 11, axis=1) + 6.0 * fine, soft)
    inner = rho < g.ring - 6.0 / min(a, b)
    soft = np.where(inner, 30.0 + 6.0 * tex + 4.0 * fine, soft)
    hu = -1000.0 + (soft + 1000.0) * body
    body = body > 0.5

    hx, hy, hax, hay, hz, hzh = g.heart
    heart_scale2 = np.clip(1.0 - ((z - hz) / hzh) ** 2, 0.0, 1.0)
    heart_q = ((x - hx) / hax) ** 2 + ((y - hy) / hay) ** 2
    heart = heart_q < heart_scale2
    mx, mw = g.mediastinum
    mediastinal_fat = inner & ~heart & (np.abs(x - mx) < mw) & (heart_q < 2.2 * heart_scale2 + 0.3)
    hu = np.where(mediastinal_fat, -85.0 + 10.0 * tex, hu)
    hu = np.where(heart, 40.0 + 4.0 * tex, hu)

    # lungs: partial-volume edge, gravity gradient (dependent lung denser), fine correlated texture
    # of the secondary lobules, and the vessel tree
    lung = _gaussian(np.broadcast_to(in_ct_lung(g, x, y, z), (n, m, m)).astype(_F32), (0.0, 0.5, 0.5))
    cy_mean = float(np.mean([c[1] for c in g.lungs]))
    ay_mean = float(np.mean([c[3] for c in g.lungs]))
    texture = _smooth_noise(r, (n, m, m), (0.5, 0.6, 0.6)) * 18.0 + _smooth_noise(r, (n, m, m), (1.0, 1.8, 1.8)) * 14.0
    parenchyma = -865.0 + 40.0 * (y - cy_mean) / ay_mean + texture
    vessel = _ct_vessel_fraction(g, site, r, lung)
    parenchyma = parenchyma * (1.0 - vessel) + 40.0 * vessel
    hu = hu * (1.0 - lung) + parenchyma * lung

    ax_, ay_, ar = g.aorta
    hu = np.where((x - ax_) ** 2 + (y - ay_) ** 2 < ar * ar, _F32(45.0), hu)
    sy, sr, disc_phase = g.spine
    d2 = x * x + (y - sy) ** 2
    disc = ((z + disc_phase) % 28.0) < 5.0
    vert_hu = np.where(disc, _F32(90.0), np.where(d2 > (sr - 3.0) ** 2, _F32(950.0), _F32(680.0)))
    hu = np.where(d2 < sr * sr, vert_hu, hu)
    hu = np.where(x * x + (y - sy - sr - 8.0) ** 2 < 7.5 ** 2, _F32(22.0), hu)
    hu = np.where(((x / 5.0) ** 2 + ((y - sy - sr - 24.0) / 9.0) ** 2 < 1.0) & body, _F32(700.0), hu)
    hu = np.where((x / 13.0) ** 2 + ((y - (yc - b + fat + 9.0)) / 5.0) ** 2 < 1.0, _F32(480.0), hu)
    # ribs: a ring of bone sections in the chest wall; they run obliquely, so each rib shows in
    # some slices only and its angle drifts with z
    offset, spacing, phase = g.ribs
    t = (np.arctan2(yn, xn) - offset - 0.004 * z) / spacing
    k = np.round(t)
    half_axis = (a + b) / 2
    d_along = (t - k) * spacing * g.ring * half_axis
    d_across = (rho - g.ring) * half_axis
    present = np.sin(z / 12.0 + 1.7 * k + phase) > -0.2
    lateral = np.abs(xn) > 0.4 * rho
    hu = np.where((d_along ** 2 / 36.0 + d_across ** 2 / 16.0 < 1.0) & present & lateral & body, _F32(650.0), hu)
    if site.ct_table:
        ty = yc + b + 10.0
        hu = np.where((np.abs(y - ty) < 4.0) & (np.abs(x) < 0.42 * site.ct_fov), _F32(-250.0), hu)
    hu = np.array(np.broadcast_to(hu, (n, m, m)), dtype=_F32)  # a writable copy
    if st.lesion is not None:
        _add_ct_lesion(hu, st.lesion, x[0, 0], y[0, :, 0], z[:, 0, 0], ps, dz, r)
    return hu


def _add_ct_lesion(hu, les: Lesion, xs, ys, zs, ps, thickness, r) -> None:
    """Blend a partial-volume nodule (averaged over the slice thickness) into ``hu`` in place."""
    reach = les.radius * (1 + les.lobulation) + 2 * ps
    cols = np.nonzero(np.abs(xs - les.x) < reach)[0]
    rows = np.nonzero(np.abs(ys - les.y) < reach)[0]
    slices = np.nonzero(np.abs(zs - les.z) < les.radius + thickness / 2)[0]
    if not (cols.size and rows.size and slices.size):
        return
    X = xs[cols][None, None, :].astype(float) - les.x
    Y = ys[rows][None, :, None].astype(float) - les.y
    dist = np.sqrt(X ** 2 + Y ** 2)
    lobe = 1.0 + les.lobulation * np.cos(3.0 * np.arctan2(Y, X) + les.phase)
    frac = np.zeros((slices.size, rows.size, cols.size))
    offsets = (np.arange(4) + 0.5) / 4 - 0.5
    for off in offsets:  # sample the slice thickness
        dzz = (zs[slices].astype(float) + off * thickness - les.z)[:, None, None]
        rho = np.sqrt(np.clip(les.radius ** 2 - dzz ** 2, 0.0, None)) * lobe
        frac += np.clip((rho - dist) / ps + 0.5, 0.0, 1.0)
    frac /= offsets.size
    texture = les.strength + 12.0 * r.standard_normal(frac.shape)
    block = hu[np.ix_(slices, rows, cols)]
    hu[np.ix_(slices, rows, cols)] = block * (1 - frac) + texture * frac


def ct_series_pixels(hu: np.ndarray, kind: str, st: StudyPlan, site: Site, r: np.random.Generator) -> np.ndarray:
    """Stored values of one reconstruction (lung or soft-tissue kernel) of the HU volume."""
    g = st.ct
    sigma_lung, sigma_soft = site.ct_noise
    if kind == "ct_lung":
        img = hu + 0.6 * (hu - _gaussian(hu, (0.0, 0.8, 0.8)))  # edge-enhancing kernel
        sigma, corr = sigma_lung * g.noise_factor, (0.0, 0.5, 0.5)
    else:
        img = _gaussian(hu, (0.0, 0.55, 0.55))
        sigma, corr = sigma_soft * g.noise_factor, (0.0, 0.7, 0.7)
    img = img + _smooth_noise(r, hu.shape, corr) * _F32(sigma)
    stored = np.rint((img - _F32(site.ct_intercept)) / _F32(site.ct_slope))
    lo, hi = _stored_range(site.ct_pixel_rep, site.ct_bits_stored)
    if site.ct_recon_circle:
        c = np.arange(site.ct_matrix) - (site.ct_matrix - 1) / 2
        stored[:, (c[None, :] ** 2 + c[:, None] ** 2) > (site.ct_matrix / 2) ** 2] = lo
    return np.clip(stored, lo, hi).astype(np.int16 if site.ct_pixel_rep else np.uint16)


def _stored_range(pixel_rep: int, bits: int) -> tuple[int, int]:
    if pixel_rep:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _band(d: np.ndarray, half_width: float) -> np.ndarray:
    """A flat-topped band profile exp(-(d/w)^4)."""
    q = (d / half_width) ** 2
    return np.exp(-q * q)


_PRESENTATION_GAIN = 1.0
_LESION_GAIN = 3.5  # a nodule is dense soft tissue (denser than the partial-volume lung it displaces)


def _large_blur(img: np.ndarray, block: int) -> np.ndarray:
    """Cheap large-kernel low-pass: block means, bilinearly interpolated back to full size."""
    rows, cols = img.shape
    small = img.reshape(rows // block, block, cols // block, block).mean(axis=(1, 3))

    def interp(n_full: int, n_small: int) -> np.ndarray:
        centres = (np.arange(n_small) + 0.5) * block - 0.5
        pos = np.clip(np.arange(n_full, dtype=float), centres[0], centres[-1])
        idx = np.clip(np.searchsorted(centres, pos, side="right") - 1, 0, n_small - 2)
        frac = (pos - centres[idx]) / block
        weights = np.zeros((n_full, n_small), dtype=_F32)
        weights[np.arange(n_full), idx] = 1 - frac
        weights[np.arange(n_full), idx + 1] = frac
        return weights

    return interp(rows, small.shape[0]) @ small.astype(_F32) @ interp(cols, small.shape[1]).T


def proj_vessel_thickness(g: ProjGeometry, r: np.random.Generator, shape, ps: float) -> tuple[np.ndarray, np.ndarray]:
    """Projected thickness (mm of blood) of the pulmonary vessel trees in the PA and the lateral view,
    each of ``shape`` (rows, cols) on the detector grid of spacing ``ps`` mm: one 3D tree
    (:func:`_vessel_tree`) per lung from its hilum, in the chest frame (x right-left, y head-feet,
    z anterior-posterior), splatted with its true volume and blurred a little per calibre."""
    lx, ly, lw, lh = g.lung
    half_depth = g.lung_depth / 2

    def inside(p: np.ndarray) -> np.ndarray:
        in_depth = ((p[:, 2] - 0.04 * g.depth) / (0.85 * half_depth)) ** 2 + ((p[:, 1] - ly) / lh) ** 2 < 1.0
        return proj_lung_field(g, p[:, 0], p[:, 1], margin=-3.0) & in_depth | (np.abs(p[:, 0]) < 0.5 * lx)

    roots = []
    for side in (-1, 1):
        hilum = np.array([side * (lx - 0.62 * lw), ly + r.uniform(0.0, 0.2) * lh, r.uniform(0.0, 15.0)])
        for _ in range(12):
            direction = r.standard_normal(3)
            direction[0] = side * (abs(direction[0]) + 0.3)
            direction[1] *= 1.4  # the lungs are taller than wide: more vessels run up and down
            roots.append((hilum, direction, r.uniform(3.5, 5.5)))
    tree = _vessel_tree(r, roots, inside, step=ps / 2, generations=7)
    rows, cols = shape
    volume = np.pi * tree[:, 3] ** 2 * tree[:, 4] / (ps * ps)
    thick = tree[:, 3] > 2.0
    out = []
    for horizontal in (tree[:, 0], tree[:, 2]):  # PA: x across; lateral: z across
        coords = np.column_stack([(tree[:, 1] + g.shift[1]) / ps + (rows - 1) / 2,
                                  (horizontal + g.shift[0]) / ps + (cols - 1) / 2])
        fine = _gaussian(_splat(shape, coords[~thick], volume[~thick]), 0.5)
        coarse = _gaussian(_splat(shape, coords[thick], volume[thick]), 1.4)
        out.append(fine + coarse)
    return out[0], out[1]


def proj_image(st: StudyPlan, view: str, site: Site, r: np.random.Generator,
                vessels: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """A chest radiograph (PA or lateral) as stored values, shape (Rows, Columns) uint16: bright =
    attenuating for MONOCHROME2, inverted for MONOCHROME1. ``vessels``: projected vessel thickness
    (mm) in the PA and lateral view from :func:`proj_vessel_thickness` (one tree per study, so both
    views show the same vessels)."""
    g = st.proj
    assert g is not None
    rows, cols, ps = site.proj_rows, site.proj_cols, site.proj_spacing
    X = ((np.arange(cols, dtype=_F32) - (cols - 1) / 2) * ps - g.shift[0])[None, :]
    Y = ((np.arange(rows, dtype=_F32) - (rows - 1) / 2) * ps - g.shift[1])[:, None]
    lx, ly, lw, lh = g.lung
    neck = 55.0
    if view == "pa":
        half = g.width / 2 * (1 + 0.03 * Y / 200.0)
        shoulder = 1 / (1 + np.exp(-(Y - g.shoulder_y) / 20.0))
        w = neck + (half - neck) * shoulder
        q = X / w
        tissue = g.depth * np.sqrt(np.clip(1 - q * q, 0, None))
        # arms beside the chest, humeral heads at the shoulders
        arm_c = half + 20.0
        arm_top = 1 / (1 + np.exp(-(Y - g.shoulder_y - 15) / 12.0))
        arm = np.sqrt(np.clip(1 - ((np.abs(X) - arm_c) / 32.0) ** 2, 0, None)) * arm_top
        humerus = _band(np.abs(X) - arm_c - 4, 8.0) * (Y > g.shoulder_y + 15)
        head = ((np.abs(X) - arm_c + 4) / 22.0) ** 2 + ((Y - g.shoulder_y - 18) / 22.0) ** 2
        humerus += np.sqrt(np.clip(1 - head, 0, None))
        air = np.zeros((rows, cols), dtype=_F32)
        lung_mask = np.zeros((rows, cols), dtype=_F32)
        for side in (-1, 1):  # -1: patient right, shown on the image left
            dome = g.dome_offset if side < 0 else 0.0  # the right hemidiaphragm sits higher
            u = (X - side * lx) / lw
            v = (Y - ly) / lh
            ue = u * (1 + 0.45 * np.clip(-v, 0, 1) ** 2)
            rr = ue * ue + v * v
            base = 0.70 + 0.30 * u * u - dome / lh
            mask = np.clip((1 - rr) * 10.0, 0, 1) * np.clip((base - v) * 20.0, 0, 1)
            lung_mask += mask
            air += mask * g.lung_depth * np.sqrt(np.sqrt(np.clip(1 - rr, 0, 1)))
        hx, hy, hax, hay = g.heart
        heart = np.sqrt(np.clip(1 - ((X - hx) / hax) ** 2 - ((Y - hy) / hay) ** 2, 0, None))
        air *= 1 - 0.9 * np.clip(heart * 3, 0, 1)
        trachea = _band(X, 8.0) * ((Y < ly - 0.25 * lh) & (Y > g.shoulder_y - 60)) * 18.0
        axx = np.clip(np.abs(X) - 18.0, 0, None)
        spine = np.sqrt(np.clip(1 - (X / 19.0) ** 2, 0, None)) * (0.75 + 0.25 * np.cos(2 * np.pi * Y / 27.0) ** 2)
        inside = (np.abs(X) < w - 10) & (axx > 2)
        rib_y0, rib_dy, slope = g.rib
        # posterior ribs: from the spine they rise a little, then arc down laterally
        t = (Y - rib_y0 + slope * axx - 0.0045 * axx * axx) / rib_dy
        ribs = _band((t - np.round(t)) * rib_dy, 5.0) * (inside & (t > -0.5) & (t < 9.5))
        # anterior ribs: fainter, running down and inwards from the lateral chest wall
        ta = (Y - rib_y0 - 55 - 0.45 * (w - np.abs(X))) / (rib_dy * 1.15)
        ribs += 0.4 * _band((ta - np.round(ta)) * rib_dy * 1.15, 6.0) * (inside & (axx > 40) & (ta > -0.5) & (ta < 5.5))
        ribs *= (0.3 + 0.7 * np.clip(lung_mask, 0, 1)) * (0.8 + 0.2 * _smooth_noise(r, (rows, cols), 6.0))
        clav = _band(Y - (g.clavicle_y - 0.22 * axx + 0.0008 * axx * axx), 6.0) * ((axx > 0) & (np.abs(X) < w))
        # lung texture: fine and coarse correlated noise of the interstitium, in the lung fields only
        lung_tex = _smooth_noise(r, (rows, cols), 0.9) + 0.8 * _smooth_noise(r, (rows, cols), 2.5)
        atten = ((tissue - air - trachea) / g.depth + 0.18 * spine + 0.11 * ribs + 0.30 * clav
                 + 0.30 * arm + 0.15 * humerus + (vessels[0] / g.depth + 0.016 * lung_tex) * np.clip(lung_mask, 0, 1))
        if g.breasts:
            for side in (-1, 1):
                br = ((X - side * lx * 1.15) / (0.9 * lw)) ** 2 + ((Y - ly - 0.75 * lh) / (0.45 * lh)) ** 2
                atten += 0.10 * np.sqrt(np.clip(1 - br, 0, None))
        les_x = st.lesion.x if st.lesion else 0.0
    else:  # lateral: horizontal axis runs anterior (left) to posterior (right)
        half = g.depth / 2 * (1 + 0.05 * Y / 200.0)
        w = neck * 0.9 + (half - neck * 0.9) / (1 + np.exp(-(Y - g.shoulder_y) / 10.0))
        q = X / w
        body = np.sqrt(np.clip(1 - q * q, 0, None))
        tissue = g.width * body
        arms = 0.35 * np.clip((g.shoulder_y + 90 - Y) / 60.0, 0, 1) * body  # raised arms over the upper chest
        u = (X - 0.08 * half) / (0.70 * half)
        v = (Y - ly) / lh
        rr = u * u + v * v
        base = 0.72 + 0.25 * u * u
        mask = np.clip((1 - rr) * 10.0, 0, 1) * np.clip((base - v) * 20.0, 0, 1)
        air = mask * 0.55 * g.width * np.sqrt(np.sqrt(np.clip(1 - rr, 0, 1)))
        hax, hay = g.heart[2] * 0.9, g.heart[3] * 1.1
        heart = np.sqrt(np.clip(1 - ((X + 0.30 * half) / hax) ** 2 - ((Y - g.heart[1]) / hay) ** 2, 0, None))
        air *= 1 - 0.8 * np.clip(heart * 3, 0, 1)
        spine = _band(X - 0.62 * half, 17.0) * (0.65 + 0.35 * (np.cos(np.pi * Y / 28.0) ** 2 > 0.12))
        stern = np.exp(-((X + 0.86 * half) / 5.0) ** 2) * ((Y > g.clavicle_y) & (Y < ly + 0.4 * lh))
        tr = (X - 0.5 * half - 0.5 * (Y - ly)) / 26.0
        ribs = _band((tr - np.round(tr)) * 26.0, 4.0) * ((X > 0.2 * half) & (np.abs(v) < 0.95)) * body
        lung_tex = _smooth_noise(r, (rows, cols), 0.9) + 0.8 * _smooth_noise(r, (rows, cols), 2.5)
        atten = ((tissue - air) / g.width * 1.05 + arms + 0.35 * spine + 0.15 * stern + 0.10 * ribs
                 + (vessels[1] * 1.05 / g.width + 0.012 * lung_tex) * np.clip(mask, 0, 1))
        les_x = st.lesion.z if st.lesion else 0.0
    atten = np.asarray(atten, dtype=_F32)
    if st.lesion is not None:  # a sphere of soft tissue: path length through it, in a small box
        les = st.lesion
        reach = les.radius * (1 + les.lobulation) + 2 * ps
        cs = np.nonzero(np.abs(X[0] - les_x) < reach)[0]
        rs = np.nonzero(np.abs(Y[:, 0] - les.y) < reach)[0]
        if cs.size and rs.size:
            dx = X[0, cs][None, :] - les_x
            dy = Y[rs, 0][:, None] - les.y
            radius = les.radius * (1 + les.lobulation * np.cos(3 * np.arctan2(dy, dx) + les.phase))
            path = 2 * np.sqrt(np.clip(radius ** 2 - dx ** 2 - dy ** 2, 0, None))
            unit = g.depth if view == "pa" else g.width / 1.05  # mm of soft tissue per unit attenuation
            atten[np.ix_(rs, cs)] += (_LESION_GAIN * les.strength / unit) * path
    # slow brightness variation (separable cosines) and heel-effect gradient
    kx, ky, px_, py_ = g.low
    low = np.cos(kx * X + px_) * np.cos(ky * Y + py_)
    atten = atten * (1 + 0.05 * low)
    # "for presentation" processing: unsharp masking with a large kernel (equalises the lung fields
    # against the mediastinum and abdomen, as DX/CR vendor processing does), then a display range
    atten = atten + _PRESENTATION_GAIN * (atten - _large_blur(atten, 16))
    signal = 0.10 + 0.55 * atten + g.tilt * Y / 200.0
    signal = _gaussian(signal, g.blur)
    signal = signal + g.noise * (0.6 + 0.6 * np.clip(signal, 0, 1)) * r.standard_normal(signal.shape, dtype=_F32)
    top = (1 << site.proj_bits) - 1
    stored = np.clip(np.rint(top * (0.02 + 0.93 * np.clip(signal, 0, 1))), 0, top)
    if site.photometric == "MONOCHROME1":
        stored = top - stored
    return stored.astype(np.uint16)


_GLYPHS = np.random.default_rng(20240601).random((64, 7, 5)) < 0.45  # fixed pseudo-font


def dose_screen_pixels(pt: PatientPlan, st: StudyPlan) -> np.ndarray:
    """An 8-bit screen capture with burned-in text rows (patient name, ID, dose table) as glyphs."""
    rows, cols = 192, 256
    img = np.full((rows, cols), 18, dtype=np.uint8)
    lines = [f"{pt.family}, {pt.given}", pt.mrn, st.accession, "CTDIvol  DLP  Phantom", "Body 32 cm"]
    for i, text in enumerate(lines):
        for j, ch in enumerate(text[:40]):
            glyph = _GLYPHS[ord(ch) % 64]
            r0, c0 = 12 + i * 14, 8 + j * 6
            if c0 + 5 > cols:
                break
            img[r0:r0 + 7, c0:c0 + 5][glyph] = 230
    img[100:104, 8:248] = 160  # table rules
    img[150:154, 8:248] = 160
    return img
