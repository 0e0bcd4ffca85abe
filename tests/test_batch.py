"""`napari-medsam batch` / `run_batch`: a cohort on a real dask.distributed LocalCluster.

Two worker processes on loopback, each loading the golden random-weight LiteMedSAM from a file
path; small phantoms written as NIfTI; one corrupt scan and one study already done. Checked:
outputs on each scan's grid equal to what `napari-medsam segment` writes, the report rows,
resume (a second run skips what is done), Ctrl+C, and one model load per worker.
"""

from __future__ import annotations

import csv
import json

import distributed
import nibabel as nib
import numpy as np
import pytest

from napari_medsam.cli import main
from napari_medsam.io import load_volume, read_labels, save_labels_named
from napari_medsam.io.nifti import write_nifti_labels, write_nifti_volume
from napari_medsam.io.segments import segments_for_labels
from napari_medsam.phantoms import make_ct_phantom
from napari_medsam.segment.batch import (
    BatchCancelled, ManifestError, labels_to_prompts, load_manifest, model_loads, run_batch, study_complete,
)

SHAPE, SPACING = (10, 48, 48), (6.0, 7.0, 7.0)

# One pytest-xdist worker should run the whole module, so that its cluster and first run (module
# fixtures) are made once, not once per worker (--dist loadgroup; xdist 3.8 under pytest 9 does
# not apply it yet: see tests/README.md).
pytestmark = pytest.mark.xdist_group("test_batch")


@pytest.fixture(scope="module")
def client():
    """Two single-threaded worker processes on loopback; closed (processes ended) after the module."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=":0", silence_logs=40) as cluster:
        with distributed.Client(cluster) as c:
            yield c


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Scans, rough label files, a prompts file, a corrupt scan, an already-done study and the manifest."""
    root = tmp_path_factory.mktemp("cohort")
    rows = ["id,image,prompts,labels,output"]
    for seed in range(3):
        volume, truth, _ = make_ct_phantom(shape=SHAPE, spacing_mm=SPACING, seed=seed)
        write_nifti_volume(volume, root / f"s{seed}.nii.gz")
        rough = np.where(truth == 1, 1, 0).astype(np.uint8)  # the liver as an earlier rough label
        write_nifti_labels(rough, volume, root / f"s{seed}_rough.nii.gz")
        rows.append(f"s{seed},s{seed}.nii.gz,,s{seed}_rough.nii.gz,out/s{seed}.nii.gz")
    # A prompts file (the `segment` format) for the scan of seed 0, written to a second output.
    (root / "p0.json").write_text(json.dumps({"coordinates": "voxel", "objects": [
        {"label": 3, "name": "kidney", "prompts": [{"type": "box", "corners": [[10, 12, 5], [30, 36, 5]]}]}]}))
    rows.append("p0,s0.nii.gz,p0.json,,out/p0.nii.gz")
    (root / "bad.nii.gz").write_bytes(b"\x1f\x8b this is not a scan")
    rows.append("bad,bad.nii.gz,,s0_rough.nii.gz,out/bad.nii.gz")
    # Already done: labels + sidecar as an earlier run leaves them (not what the model would give).
    volume = load_volume(root / "s1.nii.gz")
    done = np.zeros(volume.shape, np.uint8)
    done[4:7, 10:20, 10:20] = 1
    (root / "out").mkdir()
    save_labels_named(done, volume, root / "out/done.nii.gz", segments_for_labels(done, names={1: "liver"}))
    rows.append("done,s1.nii.gz,,s1_rough.nii.gz,out/done.nii.gz")
    (root / "manifest.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture(scope="module")
def first_run(client, cohort, golden_dir):
    """The cohort's first run; the 'done' study's file before it, to prove it was not touched."""
    before = (cohort / "out/done.nii.gz").read_bytes()
    result = run_batch(cohort / "manifest.csv", client, report=cohort / "REPORT.csv",
                       checkpoint=str(golden_dir / "lite_medsam_random.pth"), threads=1)
    return result, before


def test_cohort_outputs_report_and_one_model_load_per_worker(client, cohort, first_run, golden_dir, capsys):
    result, done_before = first_run
    status = {s["id"]: s["status"] for s in result.studies}
    assert status == {"s0": "done", "s1": "done", "s2": "done", "p0": "done", "bad": "failed", "done": "skipped"}
    bad = next(s for s in result.studies if s["id"] == "bad")
    assert "bad.nii.gz" in bad["error"] and "\n" not in bad["error"]
    assert not (cohort / "out/bad.nii.gz").exists()
    assert (cohort / "out/done.nii.gz").read_bytes() == done_before  # skipped, not recomputed

    for seed in range(3):  # labels on the scan's own grid, the liver's box found something
        scan, out = nib.load(str(cohort / f"s{seed}.nii.gz")), nib.load(str(cohort / f"out/s{seed}.nii.gz"))
        assert out.shape == scan.shape and np.allclose(out.affine, scan.affine)
        assert set(np.unique(np.asarray(out.dataobj))) == {0, 1}
        assert json.loads((cohort / f"out/s{seed}.segments.json").read_text())
    # The prompts-file study equals `napari-medsam segment` on the same scan, prompts and model.
    code = main(["segment", str(cohort / "s0.nii.gz"), "--prompts", str(cohort / "p0.json"), "--out",
                 str(cohort / "single.nii.gz"), "--checkpoint", str(golden_dir / "lite_medsam_random.pth"),
                 "--device", "cpu", "--quiet"])
    assert code == 0
    capsys.readouterr()
    like = load_volume(cohort / "s0.nii.gz")
    batch_labels = read_labels(cohort / "out/p0.nii.gz", like)
    assert batch_labels.any()
    assert np.array_equal(batch_labels, read_labels(cohort / "single.nii.gz", like))

    # Each worker that segmented loaded the model exactly once, although it ran several studies.
    loads = client.run(model_loads)
    segmenting = {s["worker"] for s in result.studies if s["status"] == "done"}
    assert segmenting <= set(loads) and all(loads[w] == 1 for w in segmenting)
    assert sum(loads.values()) == len(segmenting)
    assert all(s["model_loads"] == 1 for s in result.studies if s["status"] == "done")

    # REPORT.csv: a row per study and object; JSON beside it with the summary.
    with open(cohort / "REPORT.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    by_study = {r["study"]: r for r in rows}
    assert [r["study"] for r in rows] == ["s0", "s1", "s2", "p0", "bad", "done"]
    p0 = by_study["p0"]
    assert (p0["label"], p0["name"], p0["status"]) == ("3", "kidney", "done")
    voxels = int((batch_labels == 3).sum())
    assert int(p0["voxels"]) == voxels
    assert float(p0["volume_ml"]) == pytest.approx(voxels * np.prod(like.spacing_mm) / 1000, rel=1e-3)
    assert p0["slice_first"] == p0["slice_last"] != ""
    assert p0["worker"] in loads
    assert by_study["done"]["voxels"] == str(3 * 10 * 10) and by_study["done"]["name"] == "liver"
    assert by_study["bad"]["error"] == bad["error"] and by_study["bad"]["label"] == ""
    document = json.loads((cohort / "REPORT.json").read_text())
    assert document["counts"] == {"done": 4, "failed": 1, "skipped": 1}
    assert document["summary"].startswith("6 studies: 4 done, 1 skipped, 1 failed")


def test_second_run_resumes_and_force_recomputes(client, cohort, first_run, golden_dir):
    outputs = {name: (cohort / "out" / name).stat().st_mtime_ns for name in ("s0.nii.gz", "p0.nii.gz")}
    again = run_batch(cohort / "manifest.csv", client, checkpoint=str(golden_dir / "lite_medsam_random.pth"),
                      threads=1)
    assert {s["id"]: s["status"] for s in again.studies} == {
        "s0": "skipped", "s1": "skipped", "s2": "skipped", "p0": "skipped", "bad": "failed", "done": "skipped"}
    assert {name: (cohort / "out" / name).stat().st_mtime_ns for name in outputs} == outputs
    # A skipped study's report rows are measured from its output.
    first = {s["id"]: s for s in first_run[0].studies}
    skipped = {s["id"]: s for s in again.studies}
    assert [o["voxels"] for o in skipped["p0"]["objects"]] == [o["voxels"] for o in first["p0"]["objects"]]
    # A half-written study (labels without their sidecar) is not complete: it runs again.
    (cohort / "out/s2.segments.json").unlink()
    studies = load_manifest(cohort / "manifest.csv")
    assert not study_complete(next(s for s in studies if s.id == "s2"))
    forced = run_batch([{"id": "s0", "image": str(cohort / "s0.nii.gz"), "labels": str(cohort / "s0_rough.nii.gz"),
                         "output": str(cohort / "out/s0.nii.gz")},
                        {"id": "s2", "image": str(cohort / "s2.nii.gz"), "labels": str(cohort / "s2_rough.nii.gz"),
                         "output": str(cohort / "out/s2.nii.gz")}],
                       client, checkpoint=str(golden_dir / "lite_medsam_random.pth"), threads=1, force=True)
    assert [s["status"] for s in forced.studies] == ["done", "done"]
    assert (cohort / "out/s0.nii.gz").stat().st_mtime_ns != outputs["s0.nii.gz"]
    assert (cohort / "out/s2.segments.json").exists()
    assert set(client.run(model_loads).values()) <= {0, 1}  # the workers kept their model


def test_ctrl_c_cancels_the_rest_and_reports_what_finished(client, cohort, golden_dir, tmp_path):
    manifest = [{"id": f"c{n}", "image": str(cohort / f"s{n % 3}.nii.gz"), "labels": str(cohort / "s0_rough.nii.gz"),
                 "output": str(tmp_path / f"c{n}.nii.gz")} for n in range(6)]

    def interrupt(done, total, study):
        raise KeyboardInterrupt

    with pytest.raises(BatchCancelled) as caught:
        run_batch(manifest, client, report=tmp_path / "REPORT.csv", progress=interrupt,
                  checkpoint=str(golden_dir / "lite_medsam_random.pth"), threads=1)
    result = caught.value.result
    assert result.cancelled and len(result.studies) == 6
    counts = result.counts()
    assert counts["cancelled"] >= 3 and counts["cancelled"] + counts.get("done", 0) + counts.get("failed", 0) == 6
    report = json.loads((tmp_path / "REPORT.json").read_text())
    assert report["cancelled"] is True
    client.cancel(list(client.futures))  # nothing of ours is left queued for the next test
    assert not list(tmp_path.glob("*.partial*"))


def test_cli_on_its_own_local_cluster(cohort, golden_dir, tmp_path, capsys):
    manifest = tmp_path / "cohort.json"
    manifest.write_text(json.dumps({"studies": [
        {"image": str(cohort / "s0.nii.gz"), "labels": str(cohort / "s0_rough.nii.gz"), "output": "labels/s0.nii.gz"},
        {"image": str(cohort / "bad.nii.gz"), "labels": str(cohort / "s0_rough.nii.gz"), "output": "labels/bad.nii.gz"},
    ]}))
    code = main(["batch", str(manifest), "--workers", "1", "--threads", "1", "--every", "2", "--checkpoint",
                 str(golden_dir / "lite_medsam_random.pth")])
    captured = capsys.readouterr()
    assert code == 1  # one study failed; the other is done
    assert "2 studies: 1 done, 1 failed" in captured.out and "1 worker(s)" in captured.out
    assert "bad: failed: VolumeReadError" in captured.err
    assert "dashboard: http://127.0.0.1:" in captured.err
    assert nib.load(str(tmp_path / "labels/s0.nii.gz")).shape == nib.load(str(cohort / "s0.nii.gz")).shape
    with open(tmp_path / "REPORT.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["study"], r["status"]) for r in rows] == [("s0", "done"), ("bad", "failed")]


def test_cli_on_a_running_scheduler(client, cohort, tmp_path, capsys):
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"id,image,labels,output\nbad,{cohort / 'bad.nii.gz'},{cohort / 's0_rough.nii.gz'},o.nii.gz\n")
    code = main(["batch", str(manifest), "--scheduler", client.scheduler.address, "--report",
                 str(tmp_path / "r/REPORT.csv"), "-q"])
    captured = capsys.readouterr()
    assert code == 1 and "1 studies: 1 failed" in captured.out
    assert captured.err.startswith("napari-medsam batch: bad: failed: VolumeReadError")
    assert json.loads((tmp_path / "r/REPORT.json").read_text())["workers"] == 2


def test_labels_give_one_box_per_object_or_sparse_markers():
    labels = np.zeros((12, 20, 20), np.uint8)
    labels[2:9, 5:10, 6:12] = 4
    labels[5, 3:15, 4:16] = 4  # its largest slice
    labels[10, 1:3, 1:4] = 7
    one = {o.label: o for o in labels_to_prompts(labels, {4: "liver"})}
    assert one[4].name == "liver" and one[7].name == "object 7"
    assert list(one[4].slices) == [5] and list(one[7].slices) == [10]
    assert one[4].slices[5].box.tolist() == [3, 4, 14, 15]
    sparse = labels_to_prompts(labels, every=3)[0]
    assert sorted(sparse.slices) == [2, 5, 8]
    assert sparse.slices[2].box.tolist() == [5, 6, 9, 11]
    with pytest.raises(Exception, match="no objects"):
        labels_to_prompts(np.zeros((3, 4, 4), np.uint8))


def test_manifest_problems_are_one_line_errors(tmp_path):
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "missing.csv")
    (tmp_path / "m.csv").write_text("image,output,prompts,labels\na.nii.gz,o.nii.gz,p.json,l.nii.gz\n")
    with pytest.raises(ManifestError, match="not both"):
        load_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("image,output,labels\na.nii.gz,o.nii.gz,l.nii.gz\nb.nii.gz,o.nii.gz,l.nii.gz\n")
    with pytest.raises(ManifestError, match="same output"):
        load_manifest(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("image,output,labels\nscans/a.nii.gz,out/a.nii.gz,a_l.nii.gz\n")
    (study,) = load_manifest(tmp_path / "m.csv")
    assert study.id == "a" and study.image == str(tmp_path / "scans/a.nii.gz")
    assert study.labels == str(tmp_path / "a_l.nii.gz") and study.prompts is None


def test_a_study_that_finds_nothing_is_complete_and_not_redone(tmp_path, monkeypatch):
    """No object found: the empty label file still gets its (empty) names file, so resume skips it."""
    from napari_medsam.segment import batch, headless
    from napari_medsam.segment.batch import BatchOptions, Study, segment_study

    volume, truth, _ = make_ct_phantom(shape=SHAPE, spacing_mm=SPACING, seed=4)
    write_nifti_volume(volume, tmp_path / "scan.nii.gz")
    write_nifti_labels(np.where(truth == 1, 1, 0).astype(np.uint8), volume, tmp_path / "rough.nii.gz")
    monkeypatch.setattr(batch, "worker_model", lambda options: None)  # no model needed: it finds nothing
    monkeypatch.setattr(headless, "segment_volume",
                        lambda vol, objects, model, **kw: (np.zeros(vol.shape, np.uint8), []))
    study = Study(id="empty", image=str(tmp_path / "scan.nii.gz"), output=str(tmp_path / "out" / "empty.nii.gz"),
                  labels=str(tmp_path / "rough.nii.gz"))
    result = segment_study(study, BatchOptions())
    assert result["status"] == "done", result["error"]
    assert not read_labels(study.output, load_volume(study.image)).any()
    assert study_complete(study)  # the next run skips it
