"""`napari-medsam finetune`: real NIfTI scans and labels in, a loadable local model and a JSON summary out."""

from __future__ import annotations

import json

import pytest
import torch

from napari_medsam.cli import main
from napari_medsam.models import registry
from napari_medsam.models.checkpoint import load_network
from napari_medsam.models.local import ENV_VAR


@pytest.fixture(autouse=True)
def _models_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "user-models"))


def test_finetune_cli_writes_a_local_model(tmp_path, sample_dir, golden_dir, capsys, monkeypatch):
    from napari_medsam.segment import finetune as engine

    seen = []
    real = engine.finetune

    def spy(model, pairs, *, config=None, **kwargs):
        seen.append(config)
        return real(model, pairs, config=config, **kwargs)

    monkeypatch.setattr(engine, "finetune", spy)
    out = tmp_path / "tuned" / "phantom_tuned.pth"
    code = main(["finetune", "--model", "lite_medsam", "--checkpoint", str(golden_dir / "lite_medsam_random.pth"),
                 "--image", str(sample_dir / "ct_phantom.nii.gz"),
                 "--labels", str(sample_dir / "ct_phantom_labels.nii.gz"),
                 "--out", str(out), "--epochs", "1", "--objects", "liver", "2", "--max-slices", "3",
                 "--val-fraction", "0.34", "--batch-size", "2", "--corrections", "1", "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert [c.corrections for c in seen] == [1] and seen[0].train_prompt_encoder
    summary = json.loads(captured.out)
    assert 0.0 <= summary["dice_before"] <= summary["dice_after"] <= 1.0  # the best state is kept
    assert summary["train_samples"] > 0 and summary["val_samples"] > 0 and summary["checkpoint"] == str(out)
    assert json.loads(out.with_suffix(".json").read_text())["objects"] == {"1": "liver", "2": "spleen"}
    assert out.with_suffix(".curve.png").is_file()
    load_network("lite_medsam", out)  # strict, in the base layout
    assert set(torch.load(out, weights_only=True)) == set(torch.load(golden_dir / "lite_medsam_random.pth",
                                                                        weights_only=True))
    assert "phantom_tuned" in [spec.name for spec in registry.list_models()]
    listed = main(["models", "--json"])
    assert listed == 0 and "phantom_tuned" in capsys.readouterr().out


def test_finetune_cli_refuses_unpaired_files(tmp_path, sample_dir, capsys):
    code = main(["finetune", "--image", str(sample_dir / "ct_phantom.nii.gz"), "--image", "b.nii.gz",
                 "--labels", "a.nii.gz", "--out", str(tmp_path / "x.pth")])
    assert code == 1 and "one --labels per --image" in capsys.readouterr().err


def test_finetune_cli_unknown_object_names_the_segments(tmp_path, sample_dir, golden_dir, capsys):
    code = main(["finetune", "--checkpoint", str(golden_dir / "lite_medsam_random.pth"),
                 "--image", str(sample_dir / "ct_phantom.nii.gz"),
                 "--labels", str(sample_dir / "ct_phantom_labels.nii.gz"),
                 "--out", str(tmp_path / "x.pth"), "--objects", "heart", "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and "heart" in err and "1=liver" in err


def test_finetune_cli_refuses_negative_corrections(tmp_path, sample_dir, capsys):
    code = main(["finetune", "--image", str(sample_dir / "ct_phantom.nii.gz"),
                 "--labels", str(sample_dir / "ct_phantom_labels.nii.gz"), "--out", str(tmp_path / "x.pth"),
                 "--corrections", "-1", "--quiet"])
    assert code == 1 and "--corrections -1" in capsys.readouterr().err
