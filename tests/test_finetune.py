"""Fine-tuning the decoder: simulated prompts, the split, saving in the base layout, cancel, learning.

The network is the golden random-weight LiteMedSAM (its masks are noise before training), the data
the project's CT phantom.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch

from napari_medsam.models import registry
from napari_medsam.models.checkpoint import load_network
from napari_medsam.models.local import ENV_VAR
from napari_medsam.models.weights import resolve_weights
from napari_medsam.phantoms import make_ct_phantom
from napari_medsam.segment.finetune import FinetuneConfig, Sample, finetune, split_samples
from napari_medsam.segment.finetune_prompts import bounding_box, correction_click, jittered_box, sample_points
from napari_medsam.segment.finetune_save import save_finetuned
from napari_medsam.segment.model import SamModel


@pytest.fixture(autouse=True)
def _models_folder(tmp_path, monkeypatch):
    """Registered local models go to this test's own folder."""
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "user-models"))


@pytest.fixture(scope="module")
def phantom():
    volume, labels, names = make_ct_phantom(seed=0)
    return volume, labels, names


@pytest.fixture(scope="module")
def lite(golden_dir):
    return SamModel.from_checkpoint("lite_medsam", golden_dir / "lite_medsam_random.pth", device="cpu")


def _disc(shape=(60, 80), centre=(30, 40), radius=12):
    rr, cc = np.mgrid[: shape[0], : shape[1]]
    return (rr - centre[0]) ** 2 + (cc - centre[1]) ** 2 <= radius**2


# --------------------------------------------------------------------------- prompts
def test_jittered_boxes_stay_in_the_image_and_near_the_object():
    mask = _disc(centre=(5, 74), radius=10)  # touches two borders
    tight = bounding_box(mask)
    rng = np.random.default_rng(1)
    for _ in range(200):
        box = jittered_box(mask, rng, jitter=0.1)
        assert 0 <= box[0] <= box[2] <= mask.shape[0] - 1 and 0 <= box[1] <= box[3] <= mask.shape[1] - 1
        size = tight[2:] - tight[:2] + 1
        assert np.all(np.abs(box - tight) <= np.tile(size, 2) * 0.1 + 1e-9)
    boxes = np.array([jittered_box(mask, rng, 0.1) for _ in range(50)])
    assert boxes.std(axis=0).max() > 0.3  # jitter really moves the sides


def test_points_fall_inside_and_outside_the_mask():
    mask = _disc()
    rng = np.random.default_rng(2)
    points, flags = sample_points(mask, rng, positive=3, negative=2)
    assert flags.tolist() == [True, True, True, False, False]
    rows, cols = points.astype(int).T
    assert mask[rows[:3], cols[:3]].all() and not mask[rows[3:], cols[3:]].any()


def test_correction_click_goes_deep_into_the_largest_error():
    target = _disc(radius=15)
    predicted = target.copy()
    predicted[:, 40:] = False  # the right half missed: a positive click there
    point, positive = correction_click(predicted, target)
    assert positive and target[int(point[0]), int(point[1])] and not predicted[int(point[0]), int(point[1])]
    leak = target | _disc(centre=(30, 70), radius=8)  # a large false region: a negative click in it
    point, positive = correction_click(leak, target)
    assert not positive and leak[int(point[0]), int(point[1])] and not target[int(point[0]), int(point[1])]
    assert correction_click(target, target) is None


# --------------------------------------------------------------------------- split
def _samples(scans=2, slices=40):
    empty = np.zeros((2, 2), bool)
    return [Sample(s, z, 1, empty, empty.astype(np.float32)) for s in range(scans) for z in range(slices)]


def test_split_by_slice_holds_out_whole_blocks():
    samples = _samples()
    config = FinetuneConfig(val_fraction=0.25, block=4, seed=3)
    train, held = split_samples(samples, config, 2)
    assert len(train) + len(held) == len(samples) and held and train
    held_blocks = {(s.scan, s.index // 4) for s in held}
    assert not any((s.scan, s.index // 4) in held_blocks for s in train)  # no block on both sides
    assert abs(len(held) / len(samples) - 0.25) < 0.05
    again = split_samples(samples, config, 2)[1]
    assert [(s.scan, s.index) for s in again] == [(s.scan, s.index) for s in held]  # seeded


def test_split_by_scan_holds_out_the_last_scan():
    train, held = split_samples(_samples(3, 5), FinetuneConfig(split="scan", val_fraction=0.3), 3)
    assert {s.scan for s in held} == {2} and {s.scan for s in train} == {0, 1}
    with pytest.raises(Exception, match="two scans"):
        split_samples(_samples(1, 5), FinetuneConfig(split="scan"), 1)


# --------------------------------------------------------------------------- run, save, cancel
def test_saved_checkpoint_has_the_base_layout_and_registers(lite, phantom, golden_dir, tmp_path):
    volume, labels, names = phantom
    config = FinetuneConfig(epochs=1, objects=(1, 2), max_slices=3, batch_size=2, val_fraction=0.34, block=1)
    result = finetune(lite, [(volume, labels)], config=config)
    assert result.train_samples and result.val_samples and len(result.curve) == 2
    base_file = golden_dir / "lite_medsam_random.pth"
    with torch.no_grad():  # whether or not the short run improved: the saved file must carry these tensors
        result.model.network.mask_decoder.iou_token.weight.add_(1.0)
    saved = save_finetuned(result, tmp_path / "liver_tuned.pth", base_spec=registry.get_model("lite_medsam"),
                           base_checkpoint=base_file, data=["phantom seed 0"], objects={1: "liver", 2: "spleen"})
    base = torch.load(base_file, weights_only=True)
    tuned = torch.load(saved.checkpoint, weights_only=True)
    assert type(tuned) is type(base) and list(tuned) == list(base)
    assert all(tuned[k].dtype == base[k].dtype and tuned[k].shape == base[k].shape for k in base)
    changed = {k for k in base if not torch.equal(tuned[k], base[k])}
    assert "mask_decoder.iou_token.weight" in changed
    assert all(k.startswith(("mask_decoder.", "prompt_encoder.")) for k in changed)  # the image encoder stays
    own = result.model.network.state_dict()
    assert all(torch.equal(tuned[k], own[k]) for k in base if k.startswith(result.trained))
    # the project's strict loader, under the base model and under the registered local model
    load_network("lite_medsam", saved.checkpoint)
    info = json.loads(saved.info.read_text())
    assert info["base_model"] == "lite_medsam" and info["objects"] == {"1": "liver", "2": "spleen"}
    assert info["dice_before"] == round(result.dice_before, 4) and info["epochs"] == 1 and info["date"]
    assert saved.curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    spec = registry.get_model("liver_tuned")
    assert spec.name in [s.name for s in registry.list_models()] and spec.pipeline == "lite_medsam"
    assert resolve_weights(spec, download=False) == saved.checkpoint
    reloaded = SamModel.from_checkpoint("liver_tuned", device="cpu", download=False)
    tuned_token = result.model.network.mask_decoder.iou_token.weight
    assert torch.equal(reloaded.network.mask_decoder.iou_token.weight, tuned_token)


def test_cancel_keeps_the_best_state(lite, phantom):
    volume, labels, _names = phantom
    stop = threading.Event()
    seen = []

    def progress(epoch, step, loss, dice):
        seen.append((epoch, step))
        if step >= 1:
            stop.set()

    before = {k: v.clone() for k, v in lite.network.mask_decoder.state_dict().items()}
    config = FinetuneConfig(epochs=3, objects=(1,), max_slices=4, batch_size=1, val_fraction=0.25, block=1)
    result = finetune(lite, [(volume, labels)], config=config, progress=progress, cancel=stop)
    assert result.cancelled and result.best_epoch == 0 and seen[-1] == (1, 1)
    assert result.dice_after == result.dice_before and len(result.curve) == 1
    tuned = result.model.network.mask_decoder.state_dict()
    assert all(torch.equal(tuned[k], before[k]) for k in before)  # the best = the untrained state
    assert all(torch.equal(lite.network.mask_decoder.state_dict()[k], before[k]) for k in before)  # base untouched


# --------------------------------------------------------------------------- it learns
@pytest.fixture
def one_thread():
    """One torch thread: on a CPU shared with other jobs, two threads spin against each other (~5x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_fine_tuning_learns_a_kidney_from_random_weights(lite, phantom, one_thread):
    """Random-weight LiteMedSAM, tuned on 8 slices of one phantom's right kidney, segments another phantom's.

    Before training its box-prompt masks are noise (Dice ~0.02); after 48 small steps (12 epochs
    of 4) it must outline the kidney of a different body (other position, texture and noise) from
    a box. Measured 0.67 here (0.68 after 80 steps), and 0.74 / 0.66 after 80 steps with config
    seeds 1 / 2 judged on phantoms 2 / 3 (docs/performance.md); the untrained decoder gives 0.017.
    The per-epoch curve (which picks the best epoch) watches 4 of the 8 held-out slices; before
    and after are judged on all 8.
    """
    volume, labels, _names = phantom
    other, other_labels, _ = make_ct_phantom(seed=1)
    config = FinetuneConfig(epochs=12, objects=(3,), max_slices=8, batch_size=2, point_fraction=0.0, eval_samples=4)
    result = finetune(lite, [(volume, labels)], validation=[(other, other_labels)], config=config)
    assert result.train_samples == 8 and result.val_samples == 8
    assert result.dice_before < 0.2
    assert result.dice_after >= 0.5 and result.dice_after - result.dice_before >= 0.3
    assert result.best_epoch > 0 and result.curve[result.best_epoch].dice == max(r.dice for r in result.curve)
    assert result.trained == ("mask_decoder", "prompt_encoder")
