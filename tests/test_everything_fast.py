"""The fast "segment everything" decoder path against the network's plain decode.

``MaskDecoder.decode_points`` shares the first block's image-side work across prompts and decodes
only the masks above the IoU threshold to logits. On the golden random-weight MobileSAM and
LiteMedSAM checkpoints, with a real phantom slice embedding, its IoU predictions and survivor
logits must equal ``network.decode(..., multimask_output=True)``, in batches whose boundaries cut
the point list anywhere; and ``segment_everything`` must give the same candidates (masks, IoU,
stability) on the fast path as on the reference path.
"""

from __future__ import annotations

import numpy as np
import pytest

from napari_medsam.phantoms import make_ct_phantom
from napari_medsam.segment.everything import EverythingSettings, segment_everything

CHECKPOINTS = {"mobile_sam": "mobile_sam_random.pt", "lite_medsam": "lite_medsam_random.pth"}
# Golden weights (0.02 scale) give logits of ~0.03 and IoUs of ~0.02; observed differences ~2e-8.
TOL = {"atol": 1e-6, "rtol": 1e-4}


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def phantom_run(request, golden_dir):
    """(model, predictor, slice index, embedding) for a phantom CT slice."""
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import SlicePredictor

    name = request.param
    model = SamModel.from_checkpoint(name, weights=golden_dir / CHECKPOINTS[name], device="cpu")
    volume, _, _ = make_ct_phantom(shape=(8, 80, 96), seed=2)
    predictor = SlicePredictor(model, volume)
    return model, predictor, 4, predictor.embed(4)


def _reference(model, embedding, coords, labels):
    import torch

    with torch.inference_mode():
        logits, iou = model.network.decode(torch.as_tensor(np.asarray(embedding)), coords, labels, None, None,
                                           multimask_output=True)
    return logits.reshape(-1, *logits.shape[-2:]), iou


def test_decode_points_equals_network_decode_across_batches(phantom_run):
    import torch

    from napari_medsam.segment.everything import _points_decode, _share_embedding

    model, _, _, embedding = phantom_run
    rng = np.random.default_rng(3)
    coords = torch.as_tensor(rng.uniform(0, model.image_size, (5, 1, 2)), dtype=torch.float32)
    labels = torch.ones((5, 1), dtype=torch.int64)
    ref_logits, ref_iou = _reference(model, embedding, coords, labels)
    # A threshold between the IoUs: some masks of the slice survive, others do not.
    ordered = ref_iou.reshape(-1).sort().values
    threshold = float(ordered[6] + ordered[7]) / 2  # halfway: rounding cannot move a mask across it
    with torch.inference_mode():
        shared = _share_embedding(model, embedding)
        everything = _points_decode(model, shared, coords, labels, None)
        parts = [_points_decode(model, shared, coords[s], labels[s], threshold) for s in (slice(0, 2), slice(2, 5))]
    assert everything.iou.shape == ref_iou.shape == (5, 3)
    torch.testing.assert_close(everything.iou, ref_iou, **TOL)
    assert everything.keep.tolist() == list(range(15))
    torch.testing.assert_close(everything.logits, ref_logits, **TOL)
    # batches of 2 + 3: IoUs of all, logits of the survivors of each, indices local to the batch
    iou = torch.cat([p.iou for p in parts])
    torch.testing.assert_close(iou, ref_iou, **TOL)
    keep = torch.cat([parts[0].keep, parts[1].keep + 6])
    expected = torch.nonzero(ref_iou.reshape(-1) > threshold).reshape(-1)
    assert 0 < len(expected) < 15
    assert keep.tolist() == expected.tolist()
    torch.testing.assert_close(torch.cat([p.logits for p in parts]), ref_logits[expected], **TOL)


def test_fast_and_reference_paths_give_the_same_candidates(phantom_run):
    import torch

    model, predictor, index, embedding = phantom_run
    # Loose thresholds fitted to the random network's small logits, so that several candidates pass.
    from napari_medsam.segment.everything import _points_decode, _share_embedding, point_grid

    grid = torch.as_tensor(point_grid(3) * model.image_size, dtype=torch.float32)[:, None, :]
    with torch.inference_mode():
        ious = _points_decode(model, _share_embedding(model, embedding), grid, torch.ones((9, 1), dtype=torch.int64),
                              float("inf")).iou  # IoUs only
    ordered = ious.reshape(-1).sort().values
    settings = EverythingSettings(points_per_side=3, points_per_batch=4,
                                  pred_iou_thresh=float(ordered[13] + ordered[14]) / 2,
                                  stability_score_thresh=0.2, stability_score_offset=0.002, box_nms_thresh=1.0)
    fast = segment_everything(predictor, index, settings)
    reference = segment_everything(predictor, index, settings, reference=True)
    assert len(reference.candidates) >= 3 and reference.n_points == 9
    assert len(fast.candidates) == len(reference.candidates)
    for a, b in zip(fast.candidates, reference.candidates):
        # a pixel whose logit is within rounding of 0 may fall either way
        assert np.count_nonzero(a.mask != b.mask) <= 2
        assert a.predicted_iou == pytest.approx(b.predicted_iou, rel=1e-4, abs=1e-6)
        assert a.stability == pytest.approx(b.stability, abs=1e-3)
        assert a.point == b.point
        np.testing.assert_allclose(a.low_res_logits, b.low_res_logits, **TOL)
