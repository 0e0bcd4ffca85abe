"""Write the project's synthetic sample data (CT and MR phantoms with ground truth) into a folder.

    python scripts/make_sample_data.py [--out sample_data] [--small] [--seed 0]

Writes ct_phantom.nii.gz, ct_phantom_labels.nii.gz, ct_phantom_dicom/ (one JPEG 2000 Lossless
file per slice), mr_phantom.nii.gz and mr_phantom_labels.nii.gz, and beside each label file its
segment names, colours and codes (ct_phantom_labels.segments.json, mr_phantom_labels.segments.json)
so readers and `napari-medsam export` name the organs. The phantoms, the DICOM UIDs and
dates are all derived from the seed, so running it again rewrites the same content. ``--small``
samples the same anatomy on a coarser grid (same field of view), for quick experiments.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

try:
    import napari_medsam  # noqa: F401
except ImportError:  # running from a source checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from pydicom.uid import JPEG2000Lossless

from napari_medsam.errors import MedSamError
from napari_medsam.io.dicom.write import write_dicom_series
from napari_medsam.io.nifti import write_nifti_labels, write_nifti_volume
from napari_medsam.io.segments import default_segment, save_segments_sidecar
from napari_medsam.phantoms import make_ct_phantom, make_mr_phantom

# Same field of view at both sizes: shape x spacing (mm) per display axis (slice, row, column).
GRIDS = {
    "default": {"ct": ((56, 168, 168), (2.8, 2.1, 2.1)), "mr": ((48, 160, 160), (3.0, 1.2, 1.2))},
    "small": {"ct": ((40, 128, 128), (4.0, 2.7, 2.7)), "mr": ((32, 112, 112), (4.5, 1.7142857, 1.7142857))},
}
CT_WINDOW = (40.0, 400.0)  # abdomen soft-tissue window: centre, width
DICOM_FOLDER = "ct_phantom_dicom"


def _replace_dicom_series(volume, out_dir: Path, seed: int) -> list[Path]:
    """Write the series into a fresh folder, then swap it for any previous one."""
    fresh = Path(tempfile.mkdtemp(prefix=f".{DICOM_FOLDER}.", dir=out_dir)) / DICOM_FOLDER
    files = write_dicom_series(
        volume, fresh, modality="CT",
        series_description="napari-medsam synthetic abdominal CT phantom",
        patient_name="Phantom^Abdomen", patient_id="MEDSAM-CT-PHANTOM",
        uid_seed=f"napari-medsam-sample-data-ct-seed{seed}-{volume.shape}",
        transfer_syntax=JPEG2000Lossless, window=CT_WINDOW,
    )
    target = out_dir / DICOM_FOLDER
    old = None
    if target.exists():
        stray = [p.name for p in target.iterdir() if p.suffix.lower() != ".dcm"]
        if stray:
            shutil.rmtree(fresh.parent)
            raise SystemExit(
                f"{target} holds files that this script did not write ({', '.join(stray[:3])}); "
                "move them away or choose another --out folder."
            )
        old = fresh.parent / "previous"
        os.replace(target, old)
    os.replace(fresh, target)
    shutil.rmtree(fresh.parent)
    target.chmod(0o755)  # temporary folders are created private; the sample folder is not
    return [target / f.name for f in files]


def make_sample_data(out_dir: Path, small: bool = False, seed: int = 0) -> dict[str, int]:
    """Generate both phantoms and write all sample files; returns {relative path: bytes}."""
    out_dir.mkdir(parents=True, exist_ok=True)
    grids = GRIDS["small" if small else "default"]
    written: dict[str, int] = {}

    def record(paths: list[Path]) -> None:
        for path in paths:
            written[str(path.relative_to(out_dir))] = path.stat().st_size

    def record_labels(labels, volume, names: dict[int, str], path: Path) -> None:
        record([write_nifti_labels(labels, volume, path)])
        # NIfTI has no place for names: the sidecar carries them (codes and colours follow from them).
        segments = [default_segment(value, name) for value, name in sorted(names.items())]
        record([save_segments_sidecar(segments, path)])

    start = time.perf_counter()
    ct, ct_labels, ct_names = make_ct_phantom(*grids["ct"], seed=seed)
    mr, mr_labels, mr_names = make_mr_phantom(*grids["mr"], seed=seed)
    print(f"phantoms generated in {time.perf_counter() - start:.2f} s")

    record([write_nifti_volume(ct, out_dir / "ct_phantom.nii.gz")])
    record_labels(ct_labels, ct, ct_names, out_dir / "ct_phantom_labels.nii.gz")
    record(_replace_dicom_series(ct, out_dir, seed))
    record([write_nifti_volume(mr, out_dir / "mr_phantom.nii.gz")])
    record_labels(mr_labels, mr, mr_names, out_dir / "mr_phantom_labels.nii.gz")
    print(f"all files written in {time.perf_counter() - start:.2f} s")
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out", type=Path, default=Path("sample_data"), help="output folder (default: sample_data)"
    )
    parser.add_argument("--small", action="store_true", help="coarser grid, same field of view")
    parser.add_argument("--seed", type=int, default=0, help="phantom seed (default 0, the committed data)")
    args = parser.parse_args(argv)
    try:
        written = make_sample_data(args.out, small=args.small, seed=args.seed)
    except MedSamError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    dicom = {k: v for k, v in written.items() if k.startswith(DICOM_FOLDER)}
    for name, size in written.items():
        if name not in dicom:
            print(f"{size / 1e6:8.2f} MB  {args.out / name}")
    print(f"{sum(dicom.values()) / 1e6:8.2f} MB  {args.out / DICOM_FOLDER}/ ({len(dicom)} files)")
    print(f"{sum(written.values()) / 1e6:8.2f} MB  total")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
