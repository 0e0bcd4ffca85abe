"""Synthetic CT and MR phantoms with ground-truth label maps: the project's own sample data.

Anatomy is defined in patient millimetres (LPS: x toward the patient's left, y posterior, z toward
the head) around the LPS origin, so organs keep their physical size and proportions on any grid
and spacing; the grid is only where that anatomy is sampled. Everything is computed from numpy
and scipy and is fully determined by ``seed`` (the seed moves organs by a few millimetres and
draws the texture and noise). Values are nominal and documented in ``sample_data/README.md``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from .volume import AxisMapping, Volume

# Labels 1-5 and 7 keep their numbers from the first phantom. Number 6 was "vertebrae" (the whole
# spine as one label); each vertebra now has its own label (11-15, top to bottom), so a
# propagation can run from one vertebra into the next, 16 holds the discs between them (what a
# model answers just past a vertebra's end), and 6 is the gallbladder. The numbers stay
# contiguous, as DICOM SEG segment numbers must be.
CT_LABELS: dict[int, str] = {
    1: "liver", 2: "spleen", 3: "right kidney", 4: "left kidney", 5: "aorta", 6: "gallbladder", 7: "lungs",
    8: "pancreas", 9: "right common iliac artery", 10: "left common iliac artery",
    11: "vertebra T12", 12: "vertebra L1", 13: "vertebra L2", 14: "vertebra L3", 15: "vertebra L4",
    16: "intervertebral discs",
}
# Vertebral levels from the top of the default field of view down, with their labels; entry i has
# its body centred at z = z0 + (2 - i) * period (see make_ct_phantom), L2 near the volume's centre.
CT_VERTEBRAE: tuple[tuple[str, int], ...] = (("T12", 11), ("L1", 12), ("L2", 13), ("L3", 14), ("L4", 15))
MR_LABELS: dict[int, str] = {1: "white matter", 2: "grey matter", 3: "ventricles", 4: "lesion"}

# Nominal Hounsfield units of the clean CT map (before partial-volume blur and noise).
CT_HU: dict[str, float] = {
    "air": -1000, "skin": 20, "fat": -100, "mesenteric fat": -90, "muscle": 50, "lung": -850,
    "liver": 60, "spleen": 50, "kidney medulla": 35, "kidney cortex": 150, "renal sinus fat": -60,
    "aorta": 250, "ivc": 120, "heart": 90, "gallbladder": 15, "pancreas": 115, "stomach wall": 45,
    "stomach fluid": 15, "bowel wall": 40, "bowel content": 20, "bowel gas": -950, "rib": 550,
    "vertebra cancellous": 400, "vertebra cortex": 700, "vertebral arch": 650, "disc": 90, "spinal canal": 20,
}
CT_NOISE_HU = 12.0

# Nominal T1-weighted signal (arbitrary units) of the clean MR map, before bias field and noise.
MR_SIGNAL: dict[str, float] = {
    "air": 0, "skin": 500, "scalp fat": 850, "skull": 60, "diploe": 380, "csf": 170, "grey matter": 620,
    "deep grey matter": 700, "white matter": 1000, "lesion": 380, "soft tissue": 450, "vitreous": 150,
}
MR_NOISE_SIGMA = 22.0

# Display axes (slice, row, column) walk LPS +z (S), +y (P) and +x (L): columns of the matrix.
DISPLAY_DIRECTION = np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
# A phantom has no file of its own; this voxel order makes writers lay it out as canonical RAS
# (i -> R, j -> A, k -> S), which every NIfTI tool displays without surprises.
RAS_FILE_AXES = AxisMapping(file_axis=(2, 1, 0), flipped=(False, True, True))


@dataclass
class _Grid:
    """Voxel-centre LPS coordinates in mm, as broadcastable axis vectors."""

    x: np.ndarray  # (1, 1, ncol)
    y: np.ndarray  # (1, nrow, 1)
    z: np.ndarray  # (nslice, 1, 1)
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]

    @property
    def origin_lps(self) -> tuple[float, float, float]:
        # From the exact float64 formula, not the float32 coordinates, so headers carry clean numbers.
        half = [round(-(n - 1) / 2.0 * s, 6) for n, s in zip(self.shape, self.spacing)]
        return (half[2], half[1], half[0])


def _grid(shape: tuple[int, int, int], spacing_mm: tuple[float, float, float]) -> _Grid:
    shape = tuple(int(n) for n in shape)  # type: ignore[assignment]
    spacing_mm = tuple(float(s) for s in spacing_mm)  # type: ignore[assignment]
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"A phantom needs a 3D shape of at least 8 voxels per axis, got {shape}.")
    if len(spacing_mm) != 3 or min(spacing_mm) <= 0:
        raise ValueError(f"Voxel spacing must be three positive millimetre values, got {spacing_mm}.")
    axes = [((np.arange(n) - (n - 1) / 2.0) * s).astype(np.float32) for n, s in zip(shape, spacing_mm)]
    return _Grid(
        x=axes[2].reshape(1, 1, -1), y=axes[1].reshape(1, -1, 1), z=axes[0].reshape(-1, 1, 1),
        shape=shape, spacing=spacing_mm,  # type: ignore[arg-type]
    )


def _radius(
    g: _Grid, centre: tuple[float, float, float], semi: tuple[float, float, float],
    yaw_deg: float = 0.0, pitch_deg: float = 0.0, bend: float = 0.0,
) -> np.ndarray:
    """Normalised radius (< 1 inside) of an ellipsoid turned by ``yaw`` about z, then tilted by ``pitch``.

    Semi-axes are (u, v, w): u starts along x and v along y before the yaw; ``pitch`` tilts u toward
    +z. ``bend`` curves the u axis quadratically along v, giving crescent or bean shapes.
    """
    dx, dy, dz = g.x - centre[0], g.y - centre[1], g.z - centre[2]
    cy, sy = np.cos(np.radians(yaw_deg)), np.sin(np.radians(yaw_deg))
    u, v = cy * dx + sy * dy, -sy * dx + cy * dy
    w = dz
    if pitch_deg:
        cp, sp = np.cos(np.radians(pitch_deg)), np.sin(np.radians(pitch_deg))
        u, w = cp * u + sp * dz, -sp * u + cp * dz
    if bend:
        u = u + bend * v * v
    return np.sqrt((u / semi[0]) ** 2 + (v / semi[1]) ** 2 + (w / semi[2]) ** 2)


def _superellipse(
    g: _Grid, a: np.ndarray, b_ant: np.ndarray | float, b_post: np.ndarray | float, p_post: float
) -> np.ndarray:
    """Normalised radius of the torso cross-section: elliptic in front, flatter at the back."""
    ax = np.abs(g.x) / a
    ant = np.sqrt(ax * ax + (g.y / b_ant) ** 2)
    post = (ax**p_post + np.abs(g.y / b_post) ** p_post) ** (1.0 / p_post)
    return np.where(g.y < 0, ant, post)


def _smooth_field(rng: np.random.Generator, g: _Grid, sigma_mm: float) -> np.ndarray:
    """Gaussian random field with unit standard deviation and correlation length ``sigma_mm``."""
    field = rng.standard_normal(g.shape, dtype=np.float32)
    field = ndimage.gaussian_filter(field, [sigma_mm / s for s in g.spacing], mode="wrap")
    return field / max(float(field.std()), 1e-6)


def _finish(clean: np.ndarray, g: _Grid, blur_mm: tuple[float, float, float]) -> np.ndarray:
    """Partial-volume smoothing of the clean map (a short blur, wider along z for thick slices)."""
    return ndimage.gaussian_filter(clean, [b / s for b, s in zip(blur_mm, g.spacing)], mode="nearest")


def _volume(array: np.ndarray, g: _Grid, modality: str, unit: str, meta: dict) -> Volume:
    return Volume(
        array=array, spacing_mm=g.spacing, origin_mm=g.origin_lps, direction=DISPLAY_DIRECTION.copy(),
        modality=modality, intensity_unit=unit, source_format="phantom", axes=RAS_FILE_AXES, metadata=meta,
    )


def _pancreas(g: _Grid, shift: tuple[float, float, float]) -> np.ndarray:
    """The pancreas: a tube of varying radius along a polyline (head, neck, body, tail), flattened front to back."""
    # (x, y, z) in mm and radius: uncinate process, head, neck, body, tail.
    nodes = np.array([
        (-30.0, -18.0, -20.0, 11.0), (-30.0, -24.0, -4.0, 15.0), (-8.0, -30.0, 8.0, 10.0),
        (24.0, -26.0, 16.0, 9.0), (50.0, -8.0, 22.0, 8.5), (68.0, 10.0, 27.0, 7.5),
    ])
    nodes[:, :3] += shift
    # Work on the bounding box of the gland only, to keep the phantom fast.
    lo, hi = nodes[:, :3].min(0) - nodes[:, 3].max(), nodes[:, :3].max(0) + nodes[:, 3].max()
    out = np.zeros(g.shape, dtype=bool)
    sel = [(g.z.ravel() >= lo[2]) & (g.z.ravel() <= hi[2]), (g.y.ravel() >= lo[1]) & (g.y.ravel() <= hi[1]),
           (g.x.ravel() >= lo[0]) & (g.x.ravel() <= hi[0])]
    if not all(s.any() for s in sel):
        return out
    idx = [np.flatnonzero(s) for s in sel]
    zz, yy, xx = (g.z.ravel()[idx[0]][:, None, None], g.y.ravel()[idx[1]][None, :, None],
                  g.x.ravel()[idx[2]][None, None, :])
    inside = np.zeros((len(idx[0]), len(idx[1]), len(idx[2])), dtype=bool)
    flat = 1.35  # front-to-back thinner than wide
    for a, b in zip(nodes[:-1], nodes[1:]):
        d = b[:3] - a[:3]
        t = np.clip(((xx - a[0]) * d[0] + (yy - a[1]) * d[1] + (zz - a[2]) * d[2]) / float(d @ d), 0.0, 1.0)
        r = a[3] + t * (b[3] - a[3])
        dist2 = (xx - a[0] - t * d[0]) ** 2 + (flat * (yy - a[1] - t * d[1])) ** 2 + (zz - a[2] - t * d[2]) ** 2
        inside |= dist2 < r * r
    out[np.ix_(idx[0], idx[1], idx[2])] = inside
    return out


def make_ct_phantom(
    shape: tuple[int, int, int] = (56, 168, 168),
    spacing_mm: tuple[float, float, float] = (2.8, 2.1, 2.1),
    seed: int = 0,
) -> tuple[Volume, np.ndarray, dict[int, str]]:
    """Synthetic contrast-enhanced abdominal CT (int16 HU) with its uint8 label map and label names."""
    g = _grid(shape, spacing_mm)
    # The fourth stream jitters the structures added later (pancreas, iliac arteries), so the
    # first three, and with them every organ of the first phantom, stay as they were for a seed.
    anatomy_seq, texture_seq, noise_seq, extra_seq = np.random.SeedSequence(seed).spawn(4)
    rng = np.random.default_rng(anatomy_seq)
    extra = np.random.default_rng(extra_seq)

    def jit(scale: float = 3.0) -> float:
        return float(rng.uniform(-scale, scale))

    def jit2(scale: float = 3.0) -> float:
        return float(extra.uniform(-scale, scale))

    x, y, z = g.x, g.y, g.z
    hu = np.full(g.shape, CT_HU["air"], dtype=np.float32)
    labels = np.zeros(g.shape, dtype=np.uint8)

    # Torso: skin, subcutaneous fat (thicker at the flanks), muscular wall, then the cavity.
    a = 148.0 + 6.0 * np.cos(z / 45.0) + jit(3)
    b_ant, b_post = 104.0 + 4.0 * np.sin(z / 70.0) + jit(2), 108.0 + jit(2)
    body = _superellipse(g, a, b_ant, b_post, 2.8) < 1
    subcut = _superellipse(g, a - 2.0, b_ant - 2.0, b_post - 2.0, 2.8) < 1
    wall = _superellipse(g, a - 22.0, b_ant - 17.0, b_post - 18.0, 2.8) < 1
    cavity = _superellipse(g, a - 33.0, b_ant - 27.0, b_post - 29.0, 2.8) < 1
    hu[body] = CT_HU["skin"]
    hu[subcut] = CT_HU["fat"]
    hu[wall] = CT_HU["muscle"]
    hu[cavity] = CT_HU["mesenteric fat"]

    # Diaphragm: two domes, the right one higher; lungs above, abdominal organs below.
    dome_r = 58.0 + jit(2) - 40.0 * (((x + 60) / 85) ** 2 + (y / 90) ** 2)
    dome_l = 52.0 + jit(2) - 40.0 * (((x - 60) / 85) ** 2 + (y / 90) ** 2)
    diaphragm = np.maximum(np.maximum(dome_r, dome_l), 22.0)
    thorax = cavity & (z > diaphragm + 2.5)
    abdomen = cavity & (z < diaphragm - 2.5)
    hu[cavity & ~thorax & ~abdomen] = CT_HU["muscle"]

    # Spine: vertebral bodies (cortical shell, cancellous core) with discs, and posterior arches.
    period, z0 = 34.0, jit(4.0)
    level_pos = np.mod(z - z0, period)  # 0..period within each vertebral level
    body_r = _radius(g, (0, 30, 0), (24, 17, 1e9), bend=0.004)
    core_r = _radius(g, (0, 30, 0), (22, 15, 1e9), bend=0.004)
    disc_half = 4.0 + 1.5 * np.clip(1 - body_r**2, 0, 1)  # endplates are slightly concave
    is_disc = np.abs(level_pos - period / 2.0) < disc_half
    vbody = (body_r < 1) & ~is_disc
    canal = np.broadcast_to((x / 9.5) ** 2 + ((y - 59) / 8.5) ** 2 < 1, g.shape)
    ring = ((x / 19) ** 2 + ((y - 60) / 17) ** 2 < 1) & ~canal & (y > 44)
    spinous = (np.abs(x) < 4.0) & (y > 70) & (y < 92 - 0.2 * (level_pos - 10))
    transverse = (np.abs(x) < 40) & (np.abs(y - 52) < 3.5)
    arch_level = (level_pos > period / 2.0 + 6.0) | (level_pos < 3.0)
    arch = (ring | spinous | transverse) & arch_level & ~canal

    # Back muscles: paraspinal columns, and psoas muscles growing toward the pelvis.
    paraspinal = (((np.abs(x) - 36) / 26) ** 2 + ((y - 78) / 20) ** 2 < 1) & body
    psoas_radius = np.clip(6.0 - 0.22 * z, 0.0, 24.0)
    psoas = ((np.abs(x) - 42) ** 2 + (y - 32) ** 2 < psoas_radius**2) & (z < 10)
    hu[paraspinal | psoas] = CT_HU["muscle"]

    # Organs stay out of the spine and back muscles, whatever their ellipsoids say.
    arch_zone = ((x / 24) ** 2 + ((y - 62) / 21) ** 2 < 1) | ((np.abs(x) < 44) & (np.abs(y - 52) < 6))
    keepout = (body_r < 1.2) | arch_zone | paraspinal | psoas
    thorax &= ~keepout
    abdomen &= ~keepout

    # Ribs: oblique bands in the muscular wall, lower in front, absent over the anterior midline.
    rib_band = wall & ~(_superellipse(g, a - 26.0, b_ant - 21.0, b_post - 22.0, 2.8) < 1) & ~cavity
    rib_phase = np.cos(2 * np.pi * (z - 0.35 * y) / 28.0) > 0.55
    ribs = rib_band & rib_phase & (z - 0.35 * y > -20.0) & ~((np.abs(x) < 45) & (y < 0))
    hu[ribs] = CT_HU["rib"]

    # Bowel loops (soft tissue with gas pockets) fill the anterior abdominal cavity.
    tex = np.random.default_rng(texture_seq)
    loops = _smooth_field(tex, g, 5.0)
    gas_field = _smooth_field(tex, g, 3.0)
    gut = abdomen & (y < 25.0) & (z < 20.0) & (loops > 0.0)
    hu[gut] = CT_HU["bowel wall"]
    hu[gut & (loops > 0.35)] = CT_HU["bowel content"]
    hu[gut & (loops > 0.35) & (gas_field > 1.3)] = CT_HU["bowel gas"]

    # Stomach, left upper quadrant, with an anterior gas cap above the air-fluid level (supine).
    stomach_r = _radius(g, (45 + jit(), -35 + jit(), 28 + jit()), (40, 33, 36), yaw_deg=-30)
    stomach = abdomen & (stomach_r < 1)
    hu[stomach] = CT_HU["stomach wall"]
    lumen = abdomen & (stomach_r < 0.88)
    hu[lumen] = CT_HU["stomach fluid"]
    hu[lumen & (y < -46.0)] = CT_HU["bowel gas"]


    # Great vessels: contrast-filled aorta left-anterior of the spine, IVC to the right. The aorta
    # divides at the L3-L4 level (about 3 cm above the default volume's inferior end) into the
    # two common iliac arteries, which diverge laterally and a little posteriorly; at the
    # bifurcation the two iliac lumens are still inside the aortic outline, so the tube branches.
    aorta_x = 14.0 + 3.0 * np.sin(z / 50.0) + jit(1.5)
    aorta_radius = 10.0 + 0.012 * z
    bifurcation_z = -45.0 + jit2(3.0)
    below = np.clip(bifurcation_z - z, 0.0, None)  # mm below the bifurcation
    aorta = ((x - aorta_x) ** 2 + (y + 1.0) ** 2 < aorta_radius**2) & body & (z >= bifurcation_z)
    iliac_radius = 6.5
    iliac_y = -1.0 + 0.15 * below
    iliacs = {}
    for side, label in ((-1, 9), (1, 10)):
        iliac_x = aorta_x + side * (3.5 + 0.55 * below)
        iliacs[label] = ((x - iliac_x) ** 2 + (y - iliac_y) ** 2 < iliac_radius**2) & body & (z < bifurcation_z)
    arteries = aorta | iliacs[9] | iliacs[10]
    # While the two lumens still overlap (one figure-of-eight lumen, no wall between them) the
    # vessel is still the aorta; the iliac arteries begin where the lumens part.
    fused = below < (iliac_radius - 3.5) / 0.55
    aorta = aorta | ((iliacs[9] | iliacs[10]) & fused)
    iliacs = {label: iliac & ~fused for label, iliac in iliacs.items()}
    ivc = (((x + 24) / 13) ** 2 + ((y - 3) / 9) ** 2 < 1) & body

    # Lungs beside the mediastinum, heart in front above the left dome.
    mediastinum = ((x - 5) / 30) ** 2 + ((y - 10) / 150) ** 2 < 1
    heart_r = _radius(g, (25, -40, 98), (66, 55, 52), yaw_deg=-20)
    heart = thorax & (heart_r < 1)
    lungs = thorax & ~mediastinum & ~heart & ~ivc & ~arteries
    hu[thorax & mediastinum] = CT_HU["mesenteric fat"]
    hu[heart] = CT_HU["heart"]
    hu[lungs] = CT_HU["lung"]
    labels[lungs] = 7

    # Kidneys: beans with the upper poles tilted medially and the hilum facing anteromedially;
    # the right one lower (pushed down by the liver), the left one slightly larger.
    kidneys = {}
    for side, label, zc, yc, semi in (
        (-1, 3, -12.0, 52.0, (28.0, 21.0, 51.0)),
        (1, 4, -4.0, 50.0, (29.0, 21.0, 53.0)),
    ):
        centre = (side * (68 + jit()), yc + jit(), zc + jit())
        yaw = side * 35.0
        pitch = side * 14.0
        outer = _radius(g, centre, semi, yaw_deg=yaw, pitch_deg=pitch)
        inner = _radius(g, centre, tuple(s - 4.5 for s in semi), yaw_deg=yaw, pitch_deg=pitch)
        hilum_centre = (centre[0] - side * 22.0, centre[1] - 10.0, centre[2])
        sinus = _radius(g, hilum_centre, (13, 9, 18), yaw_deg=yaw) < 1
        kidney = (outer < 1) & ~sinus & body & ~keepout
        kidneys[label] = outer < 1.15  # with a margin, so the liver keeps a renal impression
        hu[(outer < 1) & sinus & body & ~keepout] = CT_HU["renal sinus fat"]
        hu[kidney] = CT_HU["kidney cortex"]
        hu[kidney & (inner < 1)] = CT_HU["kidney medulla"]
        labels[kidney] = label

    # Liver: a big right lobe and a tapering left lobe, blended; its dome follows the diaphragm.
    dz = np.clip(-(z + 2.0) / 76.0, 0.0, 1.0)  # narrower toward the inferior tip
    right_lobe = _radius(g, (-56 + jit(), -4 + jit(), -2 + jit()), (88, 100, 76)) * (1 + 0.18 * dz)
    left_lobe = _radius(g, (14 + jit(), -50 + jit(), 30 + jit()), (70, 40, 34), yaw_deg=-15)
    blend = -0.12 * np.logaddexp(-right_lobe / 0.12, -left_lobe / 0.12)  # smooth union of the lobes
    liver = abdomen & (blend < 1) & ~kidneys[3] & ~kidneys[4] & ~ivc & ~arteries
    # Gallbladder: a fluid-filled pear in the gallbladder fossa, under the liver and touching it
    # (cut out of the liver); its fundus hangs below the liver's anterior edge.
    gallbladder = _radius(g, (-42 + jit(), -52 + jit(), -12 + jit()), (16, 20, 34), pitch_deg=-20) < 1
    liver &= ~gallbladder
    gallbladder &= abdomen & ~labels.astype(bool)
    # Pancreas: a thin enhancing gland along a curve rising from the head (right, inferior, beside
    # the duodenal C-loop) through the neck in front of the vessels to the tail at the splenic
    # hilum (left, superior, posterior), so its axial cross-section changes from slice to slice:
    # a thick round head low down, a thin oblique body and tail higher up. It is cut out of the
    # liver and stops at the spleen, so both touch it; the stomach's back wall touches the body.
    pancreas = _pancreas(g, (jit2(3.0), jit2(3.0), jit2(3.0)))
    pancreas &= abdomen & ~keepout & ~gallbladder & ~kidneys[3] & ~kidneys[4] & ~ivc & ~arteries
    pancreas &= ~(_radius(g, (-4, -2, 0), (14, 12, 1e9)) < 1)  # portal confluence and SMA/SMV fat
    liver &= ~pancreas
    hu[liver] = CT_HU["liver"]
    labels[liver] = 1
    hu[gallbladder] = CT_HU["gallbladder"]
    labels[gallbladder] = 6

    # Spleen: a crescent along the left posterolateral wall, under the left dome.
    spleen_r = _radius(g, (76 + jit(), 36 + jit(), 26 + jit()), (26, 64, 54), yaw_deg=40, bend=0.01)
    spleen = abdomen & (spleen_r < 1) & ~kidneys[4]
    hu[spleen] = CT_HU["spleen"]
    labels[spleen] = 2
    pancreas &= ~spleen
    hu[pancreas] = CT_HU["pancreas"]
    labels[pancreas] = 8

    hu[ivc] = CT_HU["ivc"]
    hu[arteries] = CT_HU["aorta"]
    labels[aorta] = 5
    for label, iliac in iliacs.items():
        labels[iliac] = label

    # Bone last, so it wins over anything drawn across it.
    hu[(body_r < 1) & is_disc] = CT_HU["disc"]
    labels[(body_r < 1) & is_disc] = 16
    hu[vbody] = CT_HU["vertebra cortex"]
    hu[vbody & (core_r < 1)] = CT_HU["vertebra cancellous"]
    hu[arch] = CT_HU["vertebral arch"]
    hu[canal] = CT_HU["spinal canal"]
    # One label per vertebra (body and arch): CT_VERTEBRAE entry i has its body at z0 + (2 - i) * period.
    # Vertebrae beyond T12-L4 (only on a field of view taller than the default) are not labelled.
    level = np.rint((z - z0) / period).astype(int)
    bone = vbody | arch
    for k, (_, label) in enumerate(CT_VERTEBRAE):
        labels[bone & (level == 2 - k)] = label

    blurred = _finish(hu, g, (1.0, 0.9, 0.9))
    noise = np.random.default_rng(noise_seq).standard_normal(g.shape, dtype=np.float32)
    noise = ndimage.gaussian_filter(noise, (0.0, 0.6, 0.6))  # CT noise is correlated in-plane
    noise *= CT_NOISE_HU / max(float(noise.std()), 1e-6)
    image = np.clip(np.rint(blurred + noise), -1024, 3071).astype(np.int16)
    meta = {"phantom": "ct", "seed": int(seed), "label_names": dict(CT_LABELS), "synthetic": True}
    return _volume(image, g, "CT", "HU", meta), labels, dict(CT_LABELS)


def make_mr_phantom(
    shape: tuple[int, int, int] = (48, 160, 160),
    spacing_mm: tuple[float, float, float] = (3.0, 1.2, 1.2),
    seed: int = 0,
) -> tuple[Volume, np.ndarray, dict[int, str]]:
    """Synthetic T1-weighted brain MR (uint16, arbitrary units) with its uint8 label map and names."""
    g = _grid(shape, spacing_mm)
    anatomy_seq, texture_seq, noise_seq = np.random.SeedSequence([seed, 1]).spawn(3)
    rng = np.random.default_rng(anatomy_seq)

    def jit(scale: float = 2.0) -> float:
        return float(rng.uniform(-scale, scale))

    x, y, z = g.x, g.y, g.z
    sig = np.full(g.shape, MR_SIGNAL["air"], dtype=np.float32)
    labels = np.zeros(g.shape, dtype=np.uint8)

    # Head layers from outside in: skin, scalp fat, skull (with bright diploe), CSF, brain.
    centre = (jit(), jit(), -20.0 + jit())
    semi = np.array([72.0, 90.0, 84.0]) * (1 + jit(0.015))
    head_r = _radius(g, centre, tuple(semi))
    layers = [
        (0.0, "skin"), (2.0, "scalp fat"), (6.0, "skull"), (8.5, "diploe"), (10.5, "skull"), (13.0, "csf"),
    ]
    for depth, tissue in layers:
        sig[_radius(g, centre, tuple(semi - depth)) < 1] = MR_SIGNAL[tissue]
    intracranial = _radius(g, centre, tuple(semi - 13.0)) < 1

    # Skull base: anterior fossa high, posterior fossa low; below it face and neck soft tissue.
    base = -30.0 - 30.0 / (1 + np.exp(-(y - 10.0) / 12.0))
    temporal_fossae = np.exp(-(((np.abs(x) - 40.0) / 20.0) ** 2) - ((y + 5.0) / 22.0) ** 2)
    base = base - 16.0 * temporal_fossae
    below = intracranial & (z < base)
    sig[below] = MR_SIGNAL["soft tissue"]
    sig[intracranial & (z < base) & (z > base - 6.0)] = MR_SIGNAL["skull"]
    for side in (-1, 1):
        orbit = _radius(g, (side * 32.0, -62.0, -40.0), (18, 16, 15))
        sig[(orbit < 1) & (head_r < 1)] = MR_SIGNAL["scalp fat"]
        sig[(orbit < 0.7) & (head_r < 1)] = MR_SIGNAL["vitreous"]

    # Brain surface 2.5 mm inside the skull; depth below it sets cortex and white matter.
    brain_semi = semi - 15.5
    brain_r = _radius(g, centre, tuple(brain_semi))
    # First-order distance to the ellipsoid surface: (1 - r) / |grad r|.
    grad = np.sqrt(sum(((c - o) / s**2) ** 2 for c, o, s in zip((x, y, z), centre, brain_semi)))
    surface_depth = (1.0 - brain_r) * brain_r / np.maximum(grad, 1e-6)
    depth = np.minimum(surface_depth, z - (base + 2.0))
    brain = (depth > 0) & intracranial

    # Gyri: a smooth random field moves the grey/white boundary; deep sulci open into CSF.
    tex = np.random.default_rng(texture_seq)
    gyri = _smooth_field(tex, g, 3.5)
    wm_depth = 3.0 + 7.0 / (1 + np.exp(2.5 * gyri))
    sulcus = brain & (gyri < -0.6) & (depth < 1.0 + 6.0 * np.clip((-gyri - 0.6) / 0.8, 0, 1))
    above_callosum = (z > centre[2] + 46.0) | (np.abs(y - centre[1]) > 52.0)
    fissure = brain & (np.abs(x - centre[0]) < 1.6) & above_callosum  # interhemispheric fissure
    wm = brain & (depth >= wm_depth)
    gm = brain & ~wm
    sig[gm] = MR_SIGNAL["grey matter"]
    sig[wm] = MR_SIGNAL["white matter"]
    labels[gm] = 2
    labels[wm] = 1

    # Deep grey nuclei (thalami, lentiform nuclei) beside the ventricles.
    cx, cy_, cz = centre
    for side in (-1, 1):
        for nc, ns in (((14.0, 8.0, -4.0), (9, 15, 10)), ((25.0, -8.0, 2.0), (7, 19, 13))):
            nucleus = _radius(g, (cx + side * nc[0], cy_ + nc[1], cz + 20 + nc[2]), ns, yaw_deg=side * 10) < 1
            sig[nucleus & brain] = MR_SIGNAL["deep grey matter"]
            labels[nucleus & brain] = 2

    # Ventricles: arched lateral ventricles diverging toward the front, and a slit third ventricle.
    yy = (y - cy_) / 36.0
    arch_z = cz + 32.0 - 10.0 * yy**2
    lateral = np.zeros(g.shape, dtype=bool)
    for side in (-1, 1):
        x_mid = cx + side * (7.0 + 5.0 * np.clip(-yy, 0, None) + 3.0 * np.clip(yy, 0, None))
        lateral |= ((x - x_mid) / 5.5) ** 2 + yy**2 + ((z - arch_z) / 7.0) ** 2 < 1
    third = _radius(g, (cx, cy_ + 2.0, cz + 18.0), (2.2, 13, 9)) < 1
    ventricles = (lateral | third) & brain
    sig[ventricles] = MR_SIGNAL["csf"]
    labels[ventricles] = 3
    sig[sulcus | fissure] = MR_SIGNAL["csf"]
    labels[sulcus | fissure] = 0

    # A small periventricular lesion, T1-hypointense.
    lesion = _radius(g, (cx + 26.0 + jit(), cy_ - 12.0 + jit(), cz + 36.0 + jit()), (7, 8, 6.5)) < 1
    lesion &= brain
    sig[lesion] = MR_SIGNAL["lesion"]
    labels[lesion] = 4

    # Smooth multiplicative bias field (receive-coil shading), then Rician magnitude noise.
    coeffs = rng.uniform(-1, 1, 6).astype(np.float32)
    xn, yn, zn = x / 100.0, y / 100.0, z / 100.0
    bias = np.exp(0.14 * (coeffs[0] * xn + coeffs[1] * yn + coeffs[2] * zn)
                  + 0.08 * (coeffs[3] * xn * yn + coeffs[4] * zn**2 + coeffs[5] * yn * zn))
    blurred = _finish(sig, g, (1.2, 0.6, 0.6)) * bias
    noise = np.random.default_rng(noise_seq).standard_normal((2, *g.shape), dtype=np.float32)
    magnitude = np.hypot(blurred + MR_NOISE_SIGMA * noise[0], MR_NOISE_SIGMA * noise[1])
    image = np.clip(np.rint(magnitude), 0, 65535).astype(np.uint16)
    meta = {"phantom": "mr", "seed": int(seed), "label_names": dict(MR_LABELS), "synthetic": True,
            "sequence": "T1-weighted (simulated)"}
    return _volume(image, g, "MR", "", meta), labels, dict(MR_LABELS)
