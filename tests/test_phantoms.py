"""The synthetic CT and MR phantoms: determinism, geometry, intensities and anatomy in patient terms."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from napari_medsam.phantoms import CT_LABELS, CT_VERTEBRAE, MR_LABELS, make_ct_phantom, make_mr_phantom

REPO = Path(__file__).resolve().parents[1]
IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)
SOLID_ORGANS = ("liver", "spleen", "right kidney", "left kidney")
VERTEBRAE = tuple(f"vertebra {level}" for level, _ in CT_VERTEBRAE)
ILIACS = ("right common iliac artery", "left common iliac artery")


@pytest.fixture(scope="module")
def ct():
    volume, labels, names = make_ct_phantom()
    return volume, labels, names


@pytest.fixture(scope="module")
def mr():
    return make_mr_phantom()


def _label(names: dict[int, str], name: str) -> int:
    return next(k for k, v in names.items() if v == name)


def _interior(mask: np.ndarray, iterations: int = 2) -> np.ndarray:
    """The mask shrunk in-plane, away from partial-volume edges."""
    return ndimage.binary_erosion(mask, IN_PLANE, iterations=iterations)


def _centroid(labels: np.ndarray, value) -> np.ndarray:
    return np.argwhere(np.isin(labels, value)).mean(axis=0)


def _slices(labels: np.ndarray, value: int) -> np.ndarray:
    """The slice indices (axis 0) where ``value`` is present."""
    return np.flatnonzero((labels == value).any(axis=(1, 2)))


def _touch(labels: np.ndarray, a: int, b: int) -> int:
    """How many voxels of ``b`` lie next to ``a`` (6-connectivity)."""
    return int(np.count_nonzero(ndimage.binary_dilation(labels == a) & (labels == b)))


def test_ct_is_deterministic_and_seed_dependent():
    a, la, _ = make_ct_phantom(shape=(24, 64, 64), spacing_mm=(6.5, 5.4, 5.4), seed=3)
    b, lb, _ = make_ct_phantom(shape=(24, 64, 64), spacing_mm=(6.5, 5.4, 5.4), seed=3)
    c, lc, _ = make_ct_phantom(shape=(24, 64, 64), spacing_mm=(6.5, 5.4, 5.4), seed=4)
    assert np.array_equal(a.array, b.array) and np.array_equal(la, lb)
    assert not np.array_equal(a.array, c.array)
    assert not np.array_equal(la, lc)  # the seed also moves organs a little


def test_mr_is_deterministic_and_seed_dependent():
    a, la, _ = make_mr_phantom(shape=(16, 48, 48), spacing_mm=(9.0, 4.0, 4.0), seed=1)
    b, lb, _ = make_mr_phantom(shape=(16, 48, 48), spacing_mm=(9.0, 4.0, 4.0), seed=1)
    c, _, _ = make_mr_phantom(shape=(16, 48, 48), spacing_mm=(9.0, 4.0, 4.0), seed=2)
    assert np.array_equal(a.array, b.array) and np.array_equal(la, lb)
    assert not np.array_equal(a.array, c.array)


def test_ct_volume_metadata_and_geometry(ct):
    volume, labels, names = ct
    assert volume.shape == (56, 168, 168) and labels.shape == volume.shape
    assert volume.array.dtype == np.int16 and labels.dtype == np.uint8
    assert volume.spacing_mm == (2.8, 2.1, 2.1)
    assert (volume.modality, volume.intensity_unit, volume.source_format) == ("CT", "HU", "phantom")
    assert names == CT_LABELS and set(np.unique(labels)) == {0, *names}
    # Display axes: slice -> +S (LPS z), row -> +P (y), column -> +L (x).
    np.testing.assert_array_equal(volume.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])
    corners = volume.index_to_world([[0, 0, 0], [55, 167, 167]])
    np.testing.assert_allclose(corners[0], -corners[1], atol=1e-9)  # centred on the LPS origin
    np.testing.assert_allclose(corners[1], [175.35, 175.35, 77.0], atol=1e-9)
    assert volume.array.min() >= -1024 and volume.array.max() <= 3071
    # Written to a file, the voxels go in canonical RAS order (i -> R, j -> A, k -> S).
    np.testing.assert_allclose(volume.file_affine_ras()[:3, :3], np.diag([2.1, 2.1, 2.8]))


@pytest.mark.parametrize(
    ("organ", "low", "high"),
    [
        ("liver", 50, 70), ("spleen", 40, 60), ("aorta", 220, 280),
        *[(v, 350, 750) for v in VERTEBRAE], ("lungs", -900, -800),
        ("gallbladder", 5, 25), ("pancreas", 100, 130), *[(i, 200, 280) for i in ILIACS],
    ],
)
def test_ct_organ_hu(ct, organ, low, high):
    volume, labels, names = ct
    small = organ in ILIACS
    inside = _interior(labels == _label(names, organ), 1 if small else 2)
    assert inside.sum() > (50 if small else 500)
    assert low <= np.median(volume.array[inside]) <= high


@pytest.mark.parametrize("organ", ["right kidney", "left kidney"])
def test_ct_kidney_cortex_enhances(ct, organ):
    volume, labels, names = ct
    mask = labels == _label(names, organ)
    rim = _interior(mask, 1) & ~_interior(mask, 3)
    core = _interior(mask, 5)
    assert 20 <= np.median(volume.array[core]) <= 50  # medulla
    assert np.median(volume.array[rim]) > np.median(volume.array[core]) + 60  # enhancing cortex


def test_ct_air_background_and_noise(ct):
    volume, labels, names = ct
    corner = volume.array[:, :12, :12]
    assert abs(np.median(corner) + 1000) <= 5
    liver = _interior(labels == _label(names, "liver"), 3)
    # Noise of a realistic level, and lightly correlated between neighbouring pixels.
    assert 8 <= volume.array[liver].std() <= 18
    air = volume.array[:, :20, :20].astype(float) + 1000
    lag1 = np.corrcoef(air[:, :, :-1].ravel(), air[:, :, 1:].ravel())[0, 1]
    assert 0.1 < lag1 < 0.9


def test_ct_anatomy_in_patient_terms(ct):
    volume, labels, names = ct
    c = {name: _centroid(labels, _label(names, name)) for name in names.values()}
    c["vertebrae"] = _centroid(labels, [_label(names, v) for v in VERTEBRAE])
    world = {name: volume.index_to_world(c[name])[0] for name in c}
    # Patient right is the low column index and negative LPS x.
    assert c["liver"][2] < c["spleen"][2] and world["liver"][0] < 0 < world["spleen"][0]
    assert c["right kidney"][2] < c["vertebrae"][2] < c["left kidney"][2]
    assert world["right kidney"][0] < 0 < world["left kidney"][0]
    # Aorta anterior of the spine (lower row, smaller y) and slightly to the patient's left.
    assert c["aorta"][1] < c["vertebrae"][1] and world["aorta"][0] > 0
    # Kidneys and spleen posterior; the liver reaches higher than the kidneys.
    for organ in ("right kidney", "left kidney", "spleen"):
        assert c[organ][1] > c["aorta"][1]
    lungs = np.argwhere(labels == _label(names, "lungs"))[:, 0]
    assert lungs.min() >= volume.shape[0] // 2  # superior slices only
    liver_top = np.argwhere(labels == _label(names, "liver"))[:, 0].max()
    assert liver_top > np.argwhere(labels == _label(names, "right kidney"))[:, 0].max()
    assert lungs.max() == volume.shape[0] - 1 and liver_top < lungs.max()


def test_ct_organ_extents_lie_inside_the_volume(ct):
    volume, labels, names = ct
    n = volume.shape[0]
    for organ in SOLID_ORGANS:
        slices = np.unique(np.argwhere(labels == _label(names, organ))[:, 0])
        assert slices.min() >= 3 and slices.max() <= n - 4, organ
        assert np.array_equal(slices, np.arange(slices.min(), slices.max() + 1)), organ  # no gaps
        assert slices.size < n - 6
    # The aorta reaches the top slice and ends inside the volume; the kidneys span fewer slices than the liver.
    aorta = _slices(labels, _label(names, "aorta"))
    assert aorta.max() == n - 1 and 6 <= aorta.min() <= n // 3
    span = {o: np.ptp(np.argwhere(labels == _label(names, o))[:, 0]) for o in SOLID_ORGANS}
    assert span["right kidney"] < span["liver"] and span["left kidney"] < span["liver"]


def test_ct_organ_volumes_are_plausible(ct):
    volume, labels, names = ct
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    ml = {name: (labels == k).sum() * voxel_ml for k, name in names.items()}
    assert 1000 <= ml["liver"] <= 2500
    assert 100 <= ml["right kidney"] <= 250 and 100 <= ml["left kidney"] <= 250
    assert 80 <= ml["spleen"] <= 350


def test_ct_shapes_are_physical_not_per_voxel():
    """The same anatomy on an isotropic grid of the same field of view has the same organ sizes."""
    volume, labels, names = make_ct_phantom(shape=(40, 86, 86), spacing_mm=(4.0, 4.0, 4.0))
    reference, ref_labels, _ = make_ct_phantom(shape=(40, 128, 128), spacing_mm=(4.0, 2.7, 2.7))
    for k in (1, 2, 3, 4):
        ml = (labels == k).sum() * np.prod(volume.spacing_mm)
        ref_ml = (ref_labels == k).sum() * np.prod(reference.spacing_mm)
        assert ml == pytest.approx(ref_ml, rel=0.12), names[k]
    # Centroids land at the same physical place.
    for k in (1, 3, 5):
        a = volume.index_to_world(_centroid(labels, k))[0]
        b = reference.index_to_world(_centroid(ref_labels, k))[0]
        assert np.abs(a - b).max() < 4.0, names[k]


def test_mr_volume_metadata(mr):
    volume, labels, names = mr
    assert volume.shape == (48, 160, 160) and labels.shape == volume.shape
    assert volume.array.dtype == np.uint16 and labels.dtype == np.uint8
    assert volume.spacing_mm == (3.0, 1.2, 1.2)
    assert (volume.modality, volume.intensity_unit, volume.source_format) == ("MR", "", "phantom")
    assert names == MR_LABELS and set(np.unique(labels)) == {0, *names}
    np.testing.assert_array_equal(volume.direction, [[0, 0, 1], [0, 1, 0], [1, 0, 0]])


def test_mr_t1_tissue_ordering(mr):
    volume, labels, names = mr
    median = {name: np.median(volume.array[_interior(labels == k, 1)]) for k, name in names.items()}
    assert median["white matter"] > 1.3 * median["grey matter"]
    assert median["grey matter"] > 2.0 * median["ventricles"]
    assert median["ventricles"] < median["lesion"] < median["grey matter"]


def test_mr_anatomy(mr):
    volume, labels, names = mr
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    ml = {name: (labels == k).sum() * voxel_ml for k, name in names.items()}
    assert 700 <= ml["white matter"] + ml["grey matter"] <= 1500
    assert 0.5 < ml["white matter"] / ml["grey matter"] < 4
    assert 5 <= ml["ventricles"] <= 40 and 0.5 <= ml["lesion"] <= 5
    # Ventricles sit near the middle, the lesion is in one hemisphere; the brain ends below the top.
    centre = np.array(volume.shape) / 2
    assert np.abs(_centroid(labels, 3)[1:] - centre[1:]).max() < 15
    assert abs(volume.index_to_world(_centroid(labels, 4))[0][0]) > 10
    brain = np.argwhere(labels > 0)[:, 0]
    assert brain.min() >= 3 and brain.max() <= volume.shape[0] - 4
    # Background is dim Rician noise (positive mean); a smooth bias field shades the white matter
    # far more than noise alone would after local averaging.
    assert 10 < volume.array[:, :10, :10].mean() < 60
    wm = _interior(labels == 1, 2)
    local = ndimage.uniform_filter(volume.array.astype(np.float32), (1, 5, 5))[wm]
    low, mid, high = np.percentile(local, [5, 50, 95])
    assert (high - low) / mid > 0.08


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match="3D shape"):
        make_ct_phantom(shape=(4, 64, 64))
    with pytest.raises(ValueError, match="spacing"):
        make_mr_phantom(spacing_mm=(3.0, 0.0, 1.2))


def test_phantoms_import_neither_torch_nor_napari():
    code = "import sys, napari_medsam.phantoms; print('torch' in sys.modules, 'napari' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def _mostly_equal(a: np.ndarray, b: np.ndarray, tolerance: int = 0) -> bool:
    """Equal up to a few boundary voxels: float rounding may differ between CPUs."""
    return a.shape == b.shape and np.mean(np.abs(a.astype(int) - b.astype(int)) > tolerance) < 1e-3


def test_committed_sample_data_matches_the_generator(sample_dir, ct, mr):
    from napari_medsam.io import load_volume, read_labels

    ct_volume, ct_labels, _ = ct
    nifti = load_volume(sample_dir / "ct_phantom.nii.gz")
    assert nifti.same_grid(ct_volume) and _mostly_equal(nifti.array, ct_volume.array, 1)
    assert _mostly_equal(read_labels(sample_dir / "ct_phantom_labels.nii.gz", nifti), ct_labels)
    series = load_volume(sample_dir / "ct_phantom_dicom")
    assert series.modality == "CT" and series.same_grid(ct_volume)
    assert np.array_equal(series.array, nifti.array)
    assert len(list((sample_dir / "ct_phantom_dicom").glob("*.dcm"))) == ct_volume.shape[0]
    mr_volume, mr_labels, _ = mr
    mr_nifti = load_volume(sample_dir / "mr_phantom.nii.gz")
    assert mr_nifti.same_grid(mr_volume) and _mostly_equal(mr_nifti.array, mr_volume.array, 1)
    assert _mostly_equal(read_labels(sample_dir / "mr_phantom_labels.nii.gz", mr_nifti), mr_labels)
    total = sum(p.stat().st_size for p in sample_dir.rglob("*") if p.is_file())
    assert total < 8_000_000


def test_script_writes_small_sample_set(tmp_path):
    from napari_medsam.io import load_volume

    out = tmp_path / "data"
    for _ in range(2):  # the second run replaces the DICOM series in place
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_sample_data.py"), "--out", str(out), "--small"],
            capture_output=True, text=True, check=True,
        )
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "ct_phantom.nii.gz", "ct_phantom_dicom", "ct_phantom_labels.nii.gz", "ct_phantom_labels.segments.json",
        "mr_phantom.nii.gz", "mr_phantom_labels.nii.gz", "mr_phantom_labels.segments.json",
    ]
    expected, _, _ = make_ct_phantom(shape=(40, 128, 128), spacing_mm=(4.0, 2.7, 2.7))
    series = load_volume(out / "ct_phantom_dicom")
    assert series.same_grid(expected) and np.array_equal(series.array, expected.array)
    assert len(list((out / "ct_phantom_dicom").iterdir())) == 40


def test_ct_aorta_divides_into_the_iliac_arteries(ct):
    volume, labels, names = ct
    n = volume.shape[0]
    aorta = _slices(labels, _label(names, "aorta"))
    assert np.array_equal(aorta, np.arange(aorta.min(), n))  # a tube from the top down to the bifurcation
    bifurcation = aorta.min()
    # A few cm above the volume's inferior end.
    assert 20.0 <= bifurcation * volume.spacing_mm[0] <= 50.0
    right, left = (_label(names, i) for i in ILIACS)
    for iliac in (right, left):
        z = _slices(labels, iliac)
        assert np.array_equal(z, np.arange(0, bifurcation)), names[iliac]  # from the bottom up to the aorta
        assert _touch(labels, iliac, _label(names, "aorta")) > 0  # the branch continues the trunk
    # Below the bifurcation there is no aorta, and the two iliacs diverge toward their own side.
    assert not (labels[:bifurcation] == _label(names, "aorta")).any()
    gap = [np.argwhere(labels[k] == left)[:, 1].mean() - np.argwhere(labels[k] == right)[:, 1].mean()
           for k in (0, bifurcation - 1)]
    assert gap[0] > gap[1] + 5  # further apart the lower they are
    assert volume.index_to_world(_centroid(labels, right))[0][0] < volume.index_to_world(_centroid(labels, left))[0][0]


def test_ct_vertebrae_are_separate_levels_with_discs_between(ct):
    volume, labels, names = ct
    spans = [_slices(labels, _label(names, v)) for v in VERTEBRAE]
    # Top to bottom: T12 at the highest slices, L4 at the lowest; each one compact, 6-12 slices.
    assert spans[0].max() == volume.shape[0] - 1 and spans[-1].min() == 0
    for upper, lower, name in zip(spans[:-1], spans[1:], VERTEBRAE[1:]):
        assert lower.max() < upper.min(), name
        assert np.array_equal(lower, np.arange(lower.min(), lower.max() + 1)), name
        disc = np.arange(lower.max() + 1, upper.min())
        assert 1 <= disc.size <= 5, name  # an intervertebral disc between neighbours
        # The disc is soft tissue in the spine's place, and no vertebra is labelled on it.
        assert not np.isin(labels[disc], [_label(names, v) for v in VERTEBRAE]).any()
        body = (_centroid(labels, _label(names, name))[1:]).astype(int)
        assert 40 <= np.median(volume.array[disc, body[0] - 2:body[0] + 3, body[1] - 2:body[1] + 3]) <= 140
    inner = spans[1:-1]
    for span in inner:
        assert 6 <= span.size <= 12
    # Neighbouring vertebrae have the same cross-section: a box on one covers the next.
    a, b = (labels == _label(names, VERTEBRAE[1])), (labels == _label(names, VERTEBRAE[2]))
    area_a, area_b = a.any(0), b.any(0)
    assert np.count_nonzero(area_a & area_b) > 0.8 * min(area_a.sum(), area_b.sum())


def test_ct_gallbladder_lies_under_the_liver_and_touches_it(ct):
    volume, labels, names = ct
    n = volume.shape[0]
    gallbladder, liver = _label(names, "gallbladder"), _label(names, "liver")
    z = _slices(labels, gallbladder)
    assert z.min() >= 3 and z.max() <= n - 4 and np.array_equal(z, np.arange(z.min(), z.max() + 1))
    assert _touch(labels, gallbladder, liver) > 100
    c = {k: volume.index_to_world(_centroid(labels, k))[0] for k in (gallbladder, liver)}
    assert c[gallbladder][0] < 0  # on the patient's right
    assert c[gallbladder][2] < c[liver][2]  # below the liver's centre
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    assert 15 <= (labels == gallbladder).sum() * voxel_ml <= 80


def test_ct_pancreas_is_thin_and_changes_along_z(ct):
    volume, labels, names = ct
    n = volume.shape[0]
    pancreas = _label(names, "pancreas")
    z = _slices(labels, pancreas)
    assert z.min() >= 3 and z.max() <= n - 4 and np.array_equal(z, np.arange(z.min(), z.max() + 1))
    voxel_ml = float(np.prod(volume.spacing_mm)) / 1000.0
    assert 25 <= (labels == pancreas).sum() * voxel_ml <= 120
    # Thin: its in-plane thickness (twice the deepest interior distance) stays under 4 cm.
    depth = max(ndimage.distance_transform_edt(labels[k] == pancreas).max() for k in z)
    assert 2 * depth * volume.spacing_mm[1] < 40
    # Head low and on the right, tail high and on the left: the cross-section moves along z.
    low, high = z[: len(z) // 4], z[-len(z) // 4:]
    col = {name: np.argwhere(labels[part] == pancreas)[:, 2].mean() for name, part in (("low", low), ("high", high))}
    assert col["high"] - col["low"] > 15
    # It touches the liver (head) and the spleen (tail).
    assert _touch(labels, pancreas, _label(names, "liver")) > 0
    assert _touch(labels, pancreas, _label(names, "spleen")) > 0
