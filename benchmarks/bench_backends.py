"""Encoder backends: speed against float32 in the same run, and fidelity against float32 and the golden data.

    python benchmarks/bench_backends.py [--models vit_b mobile_sam lite_medsam] [--backends bf16 int8]
        [--repeats 3] [--threads 2] [--levers] [--golden DIR]

For each model the float32 encoder and each approximate backend (models/backends.py) take turns
on the same 512x512 CT slice of the project's phantom (order flipped every pair); printed per
backend: median seconds of both, the median of the per-pair ratios (float32 / backend; > 1 means
faster), and its fidelity:

* ``emb rel``: relative L2 error of the phantom embedding against float32;
* ``golden``: the largest difference from the official embedding of the golden data (the golden
  tests demand <= 1e-4), "pass" or "fail" (vit_b uses the depth-2 golden checkpoint for this);
* ``Dice``: masks from a box around every organ of the phantom slice decoded from the backend's
  embedding against the same boxes decoded from the float32 embedding: mean and worst Dice, and
  the number of pixels that differ in all.

The weights are random (the golden checkpoints; ViT-B at full depth with seeded random weights),
so the masks are not anatomy: the Dice column measures how much the backend moves a decision
boundary, which is what it would move on a real checkpoint too.

``--levers`` also times two levers that were measured and not kept (see docs/performance.md),
when their packages are importable: ``torch.compile`` of the encoder (first call and steady
state) and ONNX Runtime on a TorchScript-exported encoder (export time, steady state, and the
largest difference from torch, since an exported graph has to be verified).

Figures only; the load average is printed before and after. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve()
DEFAULT_GOLDEN = HERE.parents[1].parent / "shared" / "golden"
GOLDEN = {"vit_b": ("sam_vit_b_depth2_random.pth", "sam_vit_b_golden.npz"),
          "mobile_sam": ("mobile_sam_random.pt", "mobile_sam_golden.npz"),
          "lite_medsam": ("lite_medsam_random.pth", "lite_medsam_golden.npz")}
ARCH = {"vit_b": "vit_b", "mobile_sam": "tiny_vit", "lite_medsam": "lite_tiny_vit"}
PIPELINE = {"vit_b": "medsam", "mobile_sam": "sam", "lite_medsam": "lite_medsam"}


def _load(arch: str, path: Path, **options):
    from napari_medsam.models.checkpoint import load_state_dict
    from napari_medsam.models.networks.sam import load_network

    return load_network(arch, load_state_dict(path), **options)


def full_vit_b():
    """ViT-B at full depth with seeded random weights (0.02 * randn; norm weights 1 + 0.02 * randn)."""
    from napari_medsam.models.networks.sam import build_network

    torch.manual_seed(0)
    net = build_network("vit_b")
    with torch.no_grad():
        for name, value in net.state_dict().items():
            if value.is_floating_point():
                noise = torch.randn(value.shape)
                value.copy_(1 + 0.02 * noise if "norm" in name and name.endswith("weight") else 0.02 * noise)
    return net.eval()


def phantom_slice() -> tuple[np.ndarray, np.ndarray]:
    """A 512x512 axial CT slice of the phantom (int16 HU) and its organ labels."""
    from napari_medsam.phantoms import make_ct_phantom

    volume, labels, _ = make_ct_phantom(shape=(24, 512, 512), spacing_mm=(5.0, 0.7, 0.7))
    k = int(np.argmax([(np.unique(s).size) for s in labels]))
    return np.asarray(volume.array[k]), labels[k]


def _golden_check(model_key: str, network, backend: str, golden: Path) -> str:
    """Largest difference from the official embedding of the golden data, with pass/fail at 1e-4."""
    from napari_medsam.models import pipelines as P
    from napari_medsam.models.backends import make_encoder_runner

    weights, arrays = GOLDEN[model_key]
    if model_key == "vit_b":
        network = _load("vit_b", golden / weights, depth=2, global_attn_indexes=(1,))
    data = np.load(golden / arrays)
    if model_key == "lite_medsam":
        tensor = torch.from_numpy(data["model_input"]).float()
    else:
        tensor = P.sam_preprocess(data["image"]).tensor
    run = make_encoder_runner(network, backend, torch.device("cpu"))
    with torch.inference_mode():
        got = run(tensor).numpy()
    diff = float(np.abs(got - data["image_embedding"]).max())
    return f"{diff:.1e} {'pass' if diff <= 1e-4 else 'fail'}"


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def _mask_fidelity(model, ref_emb, emb, image: np.ndarray, labels: np.ndarray) -> str:
    geometry = model.geometry(*image.shape)
    dices, flips = [], 0
    for value in np.unique(labels)[1:]:
        rows, cols = np.nonzero(labels == value)
        if rows.size < 50:
            continue
        box = np.array([cols.min(), rows.min(), cols.max(), rows.max()], np.float64)
        a = model.decode(ref_emb, geometry, box_xyxy=box).masks[0]
        b = model.decode(emb, geometry, box_xyxy=box).masks[0]
        dices.append(_dice(a, b))
        flips += int((a != b).sum())
    return f"{statistics.mean(dices):.4f} / {min(dices):.4f} ({flips} px, {len(dices)} boxes)"


def _pairs(first, second, repeats: int) -> tuple[list[float], list[float]]:
    """Alternate two callables (order flipped every pair): their times in seconds."""
    a_times, b_times = [], []
    for i in range(repeats):
        for which in ((0, 1) if i % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            (first, second)[which]()
            (a_times, b_times)[which].append(time.perf_counter() - start)
    return a_times, b_times


def _ratio(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b))


def bench_model(key: str, backends: list[str], repeats: int, golden: Path, levers: bool) -> list[str]:
    from napari_medsam.models.backends import backend_status
    from napari_medsam.segment.intensity import ct_window
    from napari_medsam.segment.model import SamModel

    network = full_vit_b() if key == "vit_b" else _load(ARCH[key], golden / GOLDEN[key][0])
    image, labels = phantom_slice()
    rgb = ct_window("soft tissue").to_rgb(image)
    exact = SamModel(network, PIPELINE[key], name=key)
    rows = []
    with torch.inference_mode():
        ref = exact.encode(rgb)  # warm-up, and the reference
    for backend in backends:
        reason = backend_status(backend, "cpu", ARCH[key])
        if reason is not None:
            rows.append(f"| {key} | {backend} | skipped: {reason} | | | | | |")
            continue
        model = SamModel(network, PIPELINE[key], name=key, backend=backend, arch=ARCH[key])
        emb = model.encode(rgb)  # warm-up (builds int8 kernels, bf16 weight copies)
        a, b = _pairs(lambda: exact.encode(rgb), lambda: model.encode(rgb), repeats)
        rel = float(np.linalg.norm(emb - ref) / np.linalg.norm(ref))
        rows.append(f"| {key} | {backend} | {statistics.median(a):.3f} | {statistics.median(b):.3f} | "
                    f"{_ratio(a, b):.2f} | {rel:.1e} | {_golden_check(key, network, backend, golden)} | "
                    f"{_mask_fidelity(exact, ref, emb, image, labels)} |")
        print(rows[-1], f"load {os.getloadavg()[0]:.2f}", flush=True)
    if levers:
        rows += _levers(key, exact, network, rgb, repeats)
    return rows


def _levers(key: str, exact, network, rgb, repeats: int) -> list[str]:
    """torch.compile and ONNX Runtime on the encoder, where importable: measured, not kept."""
    from napari_medsam.models import pipelines as P

    tensor = P.prepare_image(exact.pipeline, rgb, exact.image_size).tensor
    encoder = network.image_encoder
    rows = []
    with torch.inference_mode():
        ref = encoder(tensor)
    try:
        start = time.perf_counter()
        compiled = torch.compile(encoder)
        with torch.inference_mode():
            out = compiled(tensor)
        first = time.perf_counter() - start
        with torch.inference_mode():
            a, b = _pairs(lambda: encoder(tensor), lambda: compiled(tensor), repeats)
        rows.append(f"| {key} | torch.compile (first call {first:.0f} s) | {statistics.median(a):.3f} | "
                    f"{statistics.median(b):.3f} | {_ratio(a, b):.2f} | max diff {float((out - ref).abs().max()):.1e} "
                    "| | |")
    except Exception as exc:  # a missing compiler, an unsupported op: say so and go on
        rows.append(f"| {key} | torch.compile | failed: {type(exc).__name__}: {str(exc)[:80]} | | | | | |")
    print(rows[-1], flush=True)
    try:
        import onnxruntime as ort
    except ImportError:
        rows.append(f"| {key} | onnxruntime | skipped: not installed | | | | | |")
        return rows
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "encoder.onnx"
        start = time.perf_counter()
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            torch.onnx.export(encoder, (tensor,), str(path), dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["embedding"])
        exported = time.perf_counter() - start
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feed = {"image": tensor.numpy()}
        out = session.run(None, feed)[0]
        with torch.inference_mode():
            a, b = _pairs(lambda: encoder(tensor), lambda: session.run(None, feed), repeats)
    rows.append(f"| {key} | onnxruntime (export {exported:.0f} s) | {statistics.median(a):.3f} | "
                f"{statistics.median(b):.3f} | {_ratio(a, b):.2f} | max diff {float(np.abs(out - ref.numpy()).max()):.1e} "
                "| | |")
    print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["vit_b", "mobile_sam", "lite_medsam"], choices=list(GOLDEN))
    parser.add_argument("--backends", nargs="+", default=["bf16", "int8"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--levers", action="store_true")
    parser.add_argument("--golden", type=Path, default=Path(os.environ.get("NAPARI_MEDSAM_GOLDEN", DEFAULT_GOLDEN)))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    header = ["| model | backend | float32 s | backend s | float32 / backend | emb rel | golden (<= 1e-4) "
              "| Dice vs float32 mean / worst |", "|---|---|---|---|---|---|---|---|"]
    rows = []
    for key in args.models:
        rows += bench_model(key, args.backends, args.repeats, args.golden, args.levers)
    print(f"load average after: {os.getloadavg()}")
    print("\n".join(header + rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
