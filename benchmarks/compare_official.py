"""Same-run speed comparison of the project's engine with the official SAM-family code.

    python benchmarks/compare_official.py [--figures vit_b mobile_sam lite_medsam box_sam box_lite_medsam]
        [--repeats 5] [--threads N] [--official-src DIR] [--rss] [--json OUT.json]
        [--backend float32|bf16|int8] [--compete N] [--propagation]

Why one run: on a shared machine absolute times drift by 1.5x within an hour, so a speed-up is
only meaningful as a ratio measured in the same process, on the same input, with the two sides
taking turns. For each figure this script builds the official model and the project's model
with the SAME seeded random weights, runs them alternately (official, project, then project,
official, ...: the order flips every pair so that a slow drift favours neither), and prints the
median official time, the median project time, the median of the per-pair ratios
(official / project; > 1 means the project is faster) and how far the outputs differ. The load
average is printed before and after, with torch's thread count.

Figures (``--figures``):

* ``vit_b``: SAM ViT-B encoder at 1024 px, full depth (12 blocks). Official: PyPI
  ``segment_anything`` ``SamPredictor.set_image``; project: ``SamModel.encode``. The weights are a
  seeded random state dict in the official layout built in memory by the golden data's rule
  (``torch.manual_seed(0)``, one ``randn`` per float entry, ``0.02 * r``, norm weights ``1 + 0.02 * r``,
  the prompt encoder's Gaussian matrix ``r``); no weight file is written.
* ``mobile_sam``: MobileSAM (TinyViT, 1024 px): official ``mobile_sam`` ``SamPredictor.set_image`` vs
  ``SamModel.encode``; weights ``mobile_sam_random.pt`` from the golden folder.
* ``lite_medsam``: LiteMedSAM (TinyViT, 256 px): the official script's own preprocessing
  (``resize_longest_side``, min-max, ``pad_image``) and ``medsam_lite_model.image_encoder`` vs
  ``SamModel.encode``; weights ``lite_medsam_random.pth``.
* ``box_sam``: prompt -> mask on a cached embedding, one box on a 512x512 CT slice: official
  ``SamPredictor.predict(box=..., multimask_output=False)`` vs ``SlicePredictor.predict``
  (depth-2 ViT-B golden weights: the encoder does not take part in this figure). The project's
  slice is prepared (``SlicePredictor.prepare``: the decoder's prompt-independent work, done
  once per slice), as the napari widget does for the slice the user is on.
* ``box_lite_medsam``: the same with LiteMedSAM: the official script's ``resize_box_to_256`` +
  ``medsam_inference`` vs ``SlicePredictor.predict`` (prepared slice).
* ``box_sam_unprepared``: ``box_sam`` on a slice that is not prepared (one-shot callers:
  propagation, the CLI).
* ``refine_sam``: a correction: the box plus the previous prediction's low-res logits as the mask
  prompt (official ``mask_input``, project ``Prompts.mask_logits``); a mask prompt makes the
  image side prompt-dependent, so the prepared work does not apply.
* ``--rss``: peak resident memory of a ViT-B process that builds the model and encodes one
  image, each side in its own fresh subprocess (``VmHWM``; values do not depend on weights).

The difference column is the max abs difference of the embeddings for encoders and the number of
mask pixels that differ for prompt figures (random 0.02-scale weights put many logits near 0, so
a few pixels may flip where |logit| ~ 1e-7; see the golden README).

``--backend`` runs the project's encoder with another backend (models/backends.py: float32 is the
exact default; bf16 and int8 are approximate, and the difference column then shows by how much).
``--compete N`` keeps N single-threaded CPU-heavy processes (numpy matrix products) running
during the figures: the "another program is busy" case, where both sides lose cores.

After an idle float32 run, each encoder figure gets its float32 ceiling under the table: the
network's matrix FLOPs (ViT-B analytic, ``vit_flops``; TinyViT by torch's FLOP counter on the
project's network), the best float32 matrix-product rate measured then, the time per slice if every
operation ran at that rate, the largest official / project ratio this CPU allows, and the project's
share of that rate.

A figure whose official code cannot be imported is reported as ``skipped (reason)``: the script
installs nothing and runs in the project's own environment too (then every figure is skipped).

Separate environment for the official code (outside the repository; never commit official code
and never copy it into the repository)::

    python3 -m venv /tmp/official
    /tmp/official/bin/pip install torch==2.13.0 segment-anything timm numpy opencv-python-headless \\
        scikit-image pillow pandas matplotlib tqdm
    /tmp/official/bin/pip install -e /path/to/napari-medsam     # or run with PYTHONPATH=src
    mkdir -p /tmp/official-src
    git clone https://github.com/ChaoningZhang/MobileSAM /tmp/official-src/MobileSAM
    git clone -b LiteMedSAM https://github.com/bowang-lab/MedSAM /tmp/official-src/LiteMedSAM
    /tmp/official/bin/python benchmarks/compare_official.py --official-src /tmp/official-src

``--official-src DIR`` (or the environment variable ``NAPARI_MEDSAM_OFFICIAL_SRC``) holds
``MobileSAM/`` (with its ``mobile_sam`` package) and ``LiteMedSAM/`` (the MedSAM repository on its
``LiteMedSAM`` branch: ``tiny_vit_sam.py``, ``CVPR24_LiteMedSAM_infer.py``, its own
``segment_anything`` copy). The golden checkpoints are read from ``--golden DIR`` (default: the
``NAPARI_MEDSAM_GOLDEN`` environment variable, else ``shared/golden`` beside the clone, as for the tests).

How the official code is run (and the two places it is helped):

* torchvision: ``segment_anything`` and ``mobile_sam`` import it for the automatic mask generator
  (``batched_nms``) and for ``SamPredictor``'s resize (``to_pil_image`` + ``resize``), and timm
  imports ``FrozenBatchNorm2d`` from it. The PyPI torchvision wheels are CUDA-linked and fail to
  import beside the CPU torch wheel. When ``import torchvision`` fails, this script puts a small
  stand-in module into ``sys.modules`` before importing the official code: ``to_pil_image`` is
  ``PIL.Image.fromarray`` and ``resize(img, (h, w))`` is ``img.resize((w, h), PIL.Image.BILINEAR)``,
  which is what torchvision does for a PIL image; NMS raises (the predictor path never calls it).
  The output line ``torchvision:`` says whether the real package or the stand-in was used.
* LiteMedSAM's inference script has its model assembly and ``argparse`` at module level: it is
  imported as a module with ``sys.argv`` pointing its checkpoint at the golden file and its output
  folders at a temporary directory; its own ``segment_anything`` copy is imported under that
  name only while the script loads (PyPI's stays in place for the other figures).
* MobileSAM's ``build_sam_vit_t`` calls ``.eval()`` before loading the weights, which leaves
  TinyViT's attention-bias cache stale; ``.eval()`` is called again, as the MobileSAM README does.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.abc
import importlib.util
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import types
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FIGURES: dict[str, str] = {
    "vit_b": "ViT-B encoder, 1024 px (SamPredictor.set_image vs SamModel.encode)",
    "mobile_sam": "MobileSAM encoder (SamPredictor.set_image vs SamModel.encode)",
    "lite_medsam": "LiteMedSAM encoder (script preprocessing + image_encoder vs SamModel.encode)",
    "box_sam": "prompt -> mask, box, 512x512 (SamPredictor.predict vs SlicePredictor.predict)",
    "box_lite_medsam": "prompt -> mask, box, 512x512 (LiteMedSAM medsam_inference vs SlicePredictor.predict)",
    "box_sam_unprepared": "prompt -> mask, box, slice not prepared (SamPredictor.predict vs SlicePredictor.predict)",
    "refine_sam": "prompt -> mask, box + previous mask (SamPredictor.predict mask_input vs SlicePredictor.predict)",
}
RSS_FIGURE = "peak RSS, ViT-B process (build + one encode, own subprocess per side)"
DEFAULT_GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"  # as tests/conftest.py
SRC_ENV = "NAPARI_MEDSAM_OFFICIAL_SRC"
GOLDEN_ENV = "NAPARI_MEDSAM_GOLDEN"
SLICE = 512
BOX_RC = (150, 120, 360, 330)  # (row0, col0, row1, col1) on the 512x512 slice


class Skipped(Exception):
    """A figure cannot run here (official package or file missing); the message says why."""


# ---------------------------------------------------------------------- results and the table
@dataclass
class FigureResult:
    """Times (seconds) of one figure, paired by index, and how far the outputs differ."""

    name: str
    label: str
    official_s: list[float] = field(default_factory=list)
    project_s: list[float] = field(default_factory=list)
    diff: float | None = None
    diff_unit: str = ""
    skipped: str | None = None
    unit: str = "s"  # "s" for times, "MiB" for the memory figure
    load: tuple[float, float, float] | None = None  # os.getloadavg() when the figure was done

    def ratios(self) -> list[float]:
        """Per-pair official / project ratios."""
        return pair_ratios(self.official_s, self.project_s)

    def summary(self) -> dict[str, Any]:
        """The row as plain values (for ``--json`` and the table)."""
        row: dict[str, Any] = {"figure": self.name, "label": self.label, "unit": self.unit}
        if self.load is not None:
            row["load"] = list(self.load)
        if self.skipped is not None:
            row["skipped"] = self.skipped
            return row
        ratios = self.ratios()
        row.update(
            official_median=statistics.median(self.official_s) if self.official_s else None,
            project_median=statistics.median(self.project_s) if self.project_s else None,
            ratio_median=statistics.median(ratios) if ratios else None,
            pairs=len(ratios),
            official=self.official_s,
            project=self.project_s,
            diff=self.diff,
            diff_unit=self.diff_unit,
        )
        return row


def pair_ratios(official: Sequence[float], project: Sequence[float]) -> list[float]:
    """official[i] / project[i] for every pair; unequal lengths are a bug in the caller."""
    if len(official) != len(project):
        raise ValueError(f"unpaired times: {len(official)} official, {len(project)} project")
    return [o / p for o, p in zip(official, project) if p > 0]


def _fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "MiB":
        return f"{value:.0f} MiB"
    return f"{value * 1000:.1f} ms" if value < 1.0 else f"{value:.2f} s"


def _fmt_diff(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "px":
        return f"{int(value)} px"
    return f"{value:.2g}"


def format_table(results: Sequence[FigureResult]) -> str:
    """A Markdown table: one row per figure, skipped figures with their reason."""
    lines = [
        "| figure | official (median) | project (median) | official / project (median of pairs) | pairs | "
        "max abs diff |",
        "|---|---|---|---|---|---|",
    ]
    for result in results:
        row = result.summary()
        if "skipped" in row:
            lines.append(f"| {result.label} | skipped ({row['skipped']}) | | | | |")
            continue
        ratio = "-" if row["ratio_median"] is None else f"{row['ratio_median']:.2f}"
        lines.append(
            f"| {result.label} | {_fmt_value(row['official_median'], result.unit)} | "
            f"{_fmt_value(row['project_median'], result.unit)} | {ratio} | {row['pairs']} | "
            f"{_fmt_diff(row['diff'], row['diff_unit'])} |"
        )
    return "\n".join(lines)


def alternate(official: Callable[[], Any], project: Callable[[], Any], repeats: int,
              warmup: int = 1) -> tuple[list[float], list[float], Any, Any]:
    """Time both callables in turns; return both time lists and each side's last output.

    ``warmup`` untimed calls of each side come first. Pair i runs official first when i is
    even and project first when i is odd, so a steady drift in machine speed cancels out.
    """
    out_o = out_p = None
    for _ in range(warmup):
        out_o = official()
        out_p = project()
    times_o: list[float] = []
    times_p: list[float] = []
    for index in range(repeats):
        order = ((official, times_o), (project, times_p))
        for fn, times in order if index % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
            if fn is official:
                out_o = out
            else:
                out_p = out
    return times_o, times_p, out_o, out_p


# ---------------------------------------------------------------------- importing the official code
class _PlaceholderMeta(type):
    """Any class attribute of a placeholder is another placeholder (``InterpolationMode.BILINEAR``)."""

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        return _placeholder(f"{cls.__qualname__}.{name}")


def _placeholder(name: str) -> type:
    """A class that stands for a torchvision name: it can be imported and subclassed, not used."""

    def refuse(self: Any, *args: Any, **kwargs: Any) -> None:
        raise RuntimeError(f"torchvision stand-in: {name} is not available (only imported, never used here)")

    return _PlaceholderMeta(name.rpartition(".")[2], (), {"__init__": refuse, "__qualname__": name})


# The torchvision modules the official predictor path and timm import; other submodules stay missing.
_STUB_MODULES = frozenset({
    "torchvision", "torchvision.ops", "torchvision.ops.boxes", "torchvision.ops.misc", "torchvision.datasets",
    "torchvision.transforms", "torchvision.transforms.functional", "torchvision.utils",
})


class _TorchvisionStub(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``torchvision`` and the submodules in ``_STUB_MODULES`` as stand-in modules.

    Only two functions are real: SamPredictor's ``to_pil_image`` and ``resize`` (the PIL bilinear
    resize torchvision itself performs on a PIL image). Every other name is a placeholder class, so
    timm's module-level imports (datasets, transforms, FrozenBatchNorm2d) succeed.
    """

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname in _STUB_MODULES:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> types.ModuleType:
        module = types.ModuleType(spec.name)
        module.__getattr__ = lambda name: _module_attr(spec.name, name)  # type: ignore[method-assign]
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        module.__path__ = []
        if module.__name__ == "torchvision":
            module.__version__ = "stand-in"
        if module.__name__ == "torchvision.transforms.functional":
            module.resize = _pil_resize
            module.to_pil_image = _to_pil_image


def _module_attr(module: str, name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    full = f"{module}.{name}"
    if full in _STUB_MODULES:  # a submodule used as an attribute (``torchvision.transforms``)
        return importlib.import_module(full)
    return _placeholder(full)


def _to_pil_image(pic: Any) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.asarray(pic))


def _pil_resize(img: Any, size: Sequence[int], *args: Any, **kwargs: Any) -> Any:
    from PIL import Image

    return img.resize((int(size[1]), int(size[0])), Image.BILINEAR)


def ensure_torchvision() -> str:
    """Import torchvision, or install the stand-in when it does not load; say which."""
    try:
        import torchvision  # noqa: F401

        return f"real ({torchvision.__version__})"
    except Exception as error:  # the CUDA-linked wheel raises RuntimeError beside CPU torch
        for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
            del sys.modules[name]
        sys.meta_path.insert(0, _TorchvisionStub())
        return f"stand-in (import failed: {type(error).__name__}; PIL bilinear resize for SamPredictor)"


def _import(name: str, hint: str) -> types.ModuleType:
    try:
        with warnings.catch_warnings():  # timm's deprecation notices, on every official import
            warnings.simplefilter("ignore")
            return importlib.import_module(name)
    except ImportError as error:
        raise Skipped(f"{name} not importable: {error}; {hint}") from None


@contextlib.contextmanager
def _on_path(folder: Path) -> Iterator[None]:
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(folder))


def _source_dir(src: Path | None, sub: str, marker: str) -> Path:
    if src is None:
        raise Skipped(f"no official sources: give --official-src DIR or set {SRC_ENV}")
    folder = src / sub
    if not (folder / marker).exists():
        raise Skipped(f"{folder / marker} not found")
    return folder


def _golden(golden: Path, name: str) -> Path:
    path = golden / name
    if not path.is_file():
        raise Skipped(f"golden checkpoint {path} not found")
    return path


def import_mobile_sam(src: Path | None) -> types.ModuleType:
    """The official ``mobile_sam`` package (needs timm) from ``src/MobileSAM``."""
    folder = _source_dir(src, "MobileSAM", "mobile_sam/__init__.py")
    with _on_path(folder):
        return _import("mobile_sam", "pip install timm")


def import_lite_medsam(src: Path | None, checkpoint: Path, workdir: Path) -> types.ModuleType:
    """LiteMedSAM's ``CVPR24_LiteMedSAM_infer.py`` as a module (its model built and loaded).

    The script imports ``segment_anything`` from its own folder; PyPI's copy (if loaded) is set
    aside while it loads and put back afterwards, so both live in one process.
    """
    folder = _source_dir(src, "LiteMedSAM", "CVPR24_LiteMedSAM_infer.py")
    saved = {n: m for n, m in sys.modules.items() if n == "segment_anything" or n.startswith("segment_anything.")}
    for name in saved:
        del sys.modules[name]
    argv = sys.argv
    sys.argv = [str(folder / "CVPR24_LiteMedSAM_infer.py"), "-lite_medsam_checkpoint_path", str(checkpoint),
                "-device", "cpu", "-o", str(workdir / "segs"), "-png_save_dir", str(workdir / "png")]
    try:
        with _on_path(folder):
            spec = importlib.util.spec_from_file_location("official_lite_medsam_infer",
                                                          folder / "CVPR24_LiteMedSAM_infer.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    spec.loader.exec_module(module)
            except ImportError as error:
                raise Skipped(f"LiteMedSAM script not importable: {error}") from None
    finally:
        sys.argv = argv
        for name in [n for n in sys.modules if n == "segment_anything" or n.startswith("segment_anything.")]:
            del sys.modules[name]
        sys.modules.update(saved)
    return module


def official_random_state(model: Any, seed: int = 0) -> dict[str, Any]:
    """The golden data's seeded random weights for an official model, built in memory.

    Walks ``model.state_dict()`` in order after ``torch.manual_seed(seed)``; one ``randn`` per
    float entry: norm weights ``1 + 0.02 r``, BatchNorm ``running_var`` ``|0.02 r| + 0.5``, the
    prompt encoder's Gaussian matrix ``r``, everything else ``0.02 r``; integers kept.
    """
    import torch

    modules = dict(model.named_modules())
    state = model.state_dict()
    torch.manual_seed(seed)
    out = {}
    for key, value in state.items():
        if not value.is_floating_point():
            out[key] = value.clone()
            continue
        r = torch.randn(value.shape, dtype=torch.float32)
        owner, _, leaf = key.rpartition(".")
        if key == "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix":
            out[key] = r
        elif leaf == "weight" and "Norm" in type(modules.get(owner)).__name__:
            out[key] = 1 + 0.02 * r
        elif leaf == "running_var":
            out[key] = (0.02 * r).abs() + 0.5
        else:
            out[key] = 0.02 * r
    return out


# ---------------------------------------------------------------------- the shared input
@functools.lru_cache(maxsize=1)
def ct_slice() -> tuple[Any, Any]:
    """A 512x512 CT slice (HU) of the project's phantom and the project's soft-tissue window."""
    import numpy as np

    from napari_medsam.phantoms import make_ct_phantom
    from napari_medsam.segment.intensity import ct_window

    volume, _, _ = make_ct_phantom(shape=(8, SLICE, SLICE), spacing_mm=(2.0, 0.8, 0.8), seed=0)
    return np.ascontiguousarray(volume.array[4:5]), ct_window("soft tissue")


def project_predictor(network: Any, pipeline: str) -> Any:
    """A SlicePredictor over the phantom slice (one slice, square pixels, memory cache)."""
    from napari_medsam.segment.model import SamModel
    from napari_medsam.segment.predictor import SlicePredictor

    volume, mapping = ct_slice()
    model = SamModel(network, pipeline, name=f"bench-{pipeline}", signature=f"bench-{pipeline}",
                     backend=PROJECT_BACKEND)
    return SlicePredictor(model, volume, mapping=mapping, signature="compare-official")


PROJECT_BACKEND = "float32"  # the project's encoder backend (--backend; models/backends.py)
COMPETITOR = ("import numpy as np\n"
              "a = np.random.default_rng(0).random((1500, 1500))\n"
              "while True:\n    a = (a @ a) / 1500.0\n")


@contextlib.contextmanager
def competing(n: int) -> Iterator[None]:
    """``n`` single-threaded CPU-heavy processes (numpy matrix products) running while the block runs."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", COMPETITOR], env=env) for _ in range(n)]
    try:
        if procs:
            time.sleep(2.0)  # let them start and reach their loop
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()


def _max_abs(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def _pixels(a: Any, b: Any) -> float:
    import numpy as np

    return float(np.count_nonzero(np.asarray(a, bool) != np.asarray(b, bool)))


# ---------------------------------------------------------------------- figures
@dataclass
class Context:
    """What the figures share: options, the golden folder, official sources, a temporary folder."""

    repeats: int
    golden: Path
    src: Path | None
    workdir: Path
    cache: dict[str, Any] = field(default_factory=dict)


def _encoder_pair(predictor: Any, project: Any, rgb: Any) -> tuple[Callable, Callable, Callable, str]:
    """An official ``SamPredictor.set_image`` and the project's ``encode`` of the same RGB slice."""
    import torch

    def run_official() -> Any:
        with torch.no_grad():
            predictor.set_image(rgb, image_format="RGB")
        return predictor.features.numpy()

    return run_official, lambda: project.model.encode(rgb), _max_abs, "abs"


def fig_vit_b(ctx: Context) -> tuple[Callable, Callable, Callable, str]:
    from napari_medsam.models.networks.sam import load_network

    sa = _import("segment_anything", "pip install segment-anything")
    official = sa.sam_model_registry["vit_b"](checkpoint=None)
    state = official_random_state(official)
    official.load_state_dict(state, strict=True)
    official.eval()
    predictor = sa.SamPredictor(official)
    project = project_predictor(load_network("vit_b", state), "sam")
    del state
    rgb = project.model_image(0)
    return _encoder_pair(predictor, project, rgb)


def fig_mobile_sam(ctx: Context) -> tuple[Callable, Callable, Callable, str]:
    import torch

    from napari_medsam.models.networks.sam import load_network

    checkpoint = _golden(ctx.golden, "mobile_sam_random.pt")
    ms = import_mobile_sam(ctx.src)
    official = ms.sam_model_registry["vit_t"](checkpoint=str(checkpoint))
    official.to("cpu").eval()  # second eval(): refreshes TinyViT's attention-bias cache (MobileSAM README)
    predictor = ms.SamPredictor(official)
    project = project_predictor(load_network("tiny_vit", torch.load(checkpoint, map_location="cpu")), "sam")
    rgb = project.model_image(0)
    return _encoder_pair(predictor, project, rgb)


def _lite(ctx: Context) -> tuple[types.ModuleType, Any]:
    """The LiteMedSAM script module and a project predictor on the same golden weights (cached)."""
    import torch

    from napari_medsam.models.networks.sam import load_network

    if "lite" not in ctx.cache:
        checkpoint = _golden(ctx.golden, "lite_medsam_random.pth")
        script = import_lite_medsam(ctx.src, checkpoint, ctx.workdir)
        project = project_predictor(load_network("lite_tiny_vit", torch.load(checkpoint, map_location="cpu")),
                                    "lite_medsam")
        ctx.cache["lite"] = (script, project)
    return ctx.cache["lite"]


def _lite_embed(script: types.ModuleType, rgb: Any) -> tuple[Any, tuple[int, int]]:
    """The 2D preprocessing and encoder call of the script's ``MedSAM_infer_npz_2D``."""
    import numpy as np
    import torch

    img_256 = script.resize_longest_side(rgb, 256)
    new_size = img_256.shape[:2]
    norm = (img_256 - img_256.min()) / np.clip(img_256.max() - img_256.min(), a_min=1e-8, a_max=None)
    tensor = torch.tensor(script.pad_image(norm, 256)).float().permute(2, 0, 1).unsqueeze(0)
    with torch.no_grad():
        return script.medsam_lite_model.image_encoder(tensor), new_size


def fig_lite_medsam(ctx: Context) -> tuple[Callable, Callable, Callable, str]:
    script, project = _lite(ctx)
    rgb = project.model_image(0)
    return (lambda: _lite_embed(script, rgb)[0].numpy()), (lambda: project.model.encode(rgb)), _max_abs, "abs"


def _box_xyxy() -> Any:
    import numpy as np

    r0, c0, r1, c1 = BOX_RC
    return np.array([c0, r0, c1, r1])


def fig_box_sam(ctx: Context, variant: str = "prepared") -> tuple[Callable, Callable, Callable, str]:
    import torch

    from napari_medsam.models.networks.sam import load_network
    from napari_medsam.segment.predictor import Prompts

    checkpoint = _golden(ctx.golden, "sam_vit_b_depth2_random.pth")
    sa = _import("segment_anything", "pip install segment-anything")
    from segment_anything.build_sam import _build_sam

    official = _build_sam(encoder_embed_dim=768, encoder_depth=2, encoder_num_heads=12,
                          encoder_global_attn_indexes=[1], checkpoint=str(checkpoint))
    official.eval()
    predictor = sa.SamPredictor(official)
    network = load_network("vit_b", torch.load(checkpoint, map_location="cpu"), depth=2, global_attn_indexes=[1])
    project = project_predictor(network, "sam")
    with torch.no_grad():
        predictor.set_image(project.model_image(0), image_format="RGB")
    project.embed(0)  # cached: the figure times prompt -> mask only
    if variant == "prepared":
        project.prepare(0)
    box, prompts = _box_xyxy(), Prompts(box=list(BOX_RC))
    mask_input = None
    if variant == "refine":
        _, _, low_res = predictor.predict(box=box, multimask_output=False)
        mask_input = low_res
        prompts.mask_logits = project.predict(0, Prompts(box=list(BOX_RC))).low_res_logits[0]

    def run_official() -> Any:
        masks, _, _ = predictor.predict(box=box, mask_input=mask_input, multimask_output=False)
        return masks[0]

    return run_official, lambda: project.predict(0, prompts).best, _pixels, "px"


def fig_box_sam_unprepared(ctx: Context) -> tuple[Callable, Callable, Callable, str]:
    return fig_box_sam(ctx, variant="unprepared")


def fig_refine_sam(ctx: Context) -> tuple[Callable, Callable, Callable, str]:
    return fig_box_sam(ctx, variant="refine")


def fig_box_lite_medsam(ctx: Context) -> tuple[Callable, Callable, Callable, str]:
    from napari_medsam.segment.predictor import Prompts

    script, project = _lite(ctx)
    rgb = project.model_image(0)
    embedding, new_size = _lite_embed(script, rgb)
    project.prepare(0)
    box, prompts, size = _box_xyxy(), Prompts(box=list(BOX_RC)), rgb.shape[:2]

    def run_official() -> Any:
        box_256 = script.resize_box_to_256(box, original_size=size)[None, ...]
        mask, _ = script.medsam_inference(script.medsam_lite_model, embedding, box_256, new_size, size)
        return mask

    return run_official, lambda: project.predict(0, prompts).best, _pixels, "px"


BUILDERS: dict[str, Callable[[Context], tuple[Callable, Callable, Callable, str]]] = {
    "vit_b": fig_vit_b,
    "mobile_sam": fig_mobile_sam,
    "lite_medsam": fig_lite_medsam,
    "box_sam": fig_box_sam,
    "box_lite_medsam": fig_box_lite_medsam,
    "box_sam_unprepared": fig_box_sam_unprepared,
    "refine_sam": fig_refine_sam,
}


def run_figure(name: str, ctx: Context, builders: dict[str, Callable] | None = None) -> FigureResult:
    """Build one figure and time it; a missing official package gives a skipped result, not an error."""
    result = FigureResult(name, FIGURES.get(name, name))
    try:
        official, project, compare, unit = (builders or BUILDERS)[name](ctx)
        # Prompt figures are fast: more pairs per repeat keep their medians steady.
        repeats = ctx.repeats if unit == "abs" else ctx.repeats * 10
        times_o, times_p, out_o, out_p = alternate(official, project, repeats)
    except Skipped as reason:
        result.skipped = str(reason)
        return result
    except Exception as error:  # a figure that breaks must not hide the others
        traceback.print_exc()
        result.skipped = f"failed: {type(error).__name__}: {error}"
        return result
    result.official_s, result.project_s = times_o, times_p
    result.diff, result.diff_unit = compare(out_o, out_p), unit
    return result


# ---------------------------------------------------------------------- the float32 ceiling
def vit_flops(dim: int = 768, depth: int = 12, heads: int = 12, global_blocks: Sequence[int] = (2, 5, 8, 11),
              grid: int = 64, window: int = 14, patch: int = 16, mlp_ratio: int = 4, out: int = 256) -> float:
    """Floating-point operations (multiply and add counted apart) of one SAM ViT encoder pass, analytically.

    Patch embedding, per block the qkv and output projections (on the zero-padded window grid in
    windowed blocks, as both codes compute them), the MLP, the attention products and the two
    relative-position products, then the neck's two convolutions. Norms, GELU and softmax are left
    out (a few GFLOP, and not matrix work).
    """
    tokens = grid * grid
    padded = -(-grid // window) * window
    head_dim = dim // heads
    total = 2.0 * tokens * dim * 3 * patch * patch
    for block in range(depth):
        if block in global_blocks:
            rows, side, count = tokens, grid, 1
        else:
            rows, side, count = padded * padded, window, (padded // window) ** 2
        total += 2.0 * rows * dim * 4 * dim  # qkv (3 dim) and the output projection (dim)
        total += 2.0 * 2 * tokens * dim * mlp_ratio * dim
        per_window = side * side
        total += count * heads * (2.0 * 2 * per_window * per_window * head_dim  # q.k and p.v
                                  + 2.0 * 2 * per_window * side * head_dim)  # relative rows and columns
    return total + 2.0 * tokens * dim * out + 2.0 * tokens * out * out * 9


def float32_matmul_rate(repeats: int = 5) -> tuple[float, str]:
    """The best float32 matrix-product rate (FLOP/s) on ViT-B's two largest linear layers, and which one."""
    import torch
    import torch.nn.functional as F

    best, where = 0.0, ""
    generator = torch.Generator().manual_seed(0)
    for rows, cin, cout in ((4096, 768, 3072), (4096, 3072, 768), (4096, 768, 2304)):
        x = torch.randn(rows, cin, generator=generator)
        weight = torch.randn(cout, cin, generator=generator)
        bias = torch.randn(cout, generator=generator)
        F.linear(x, weight, bias)
        for _ in range(repeats):
            start = time.perf_counter()
            F.linear(x, weight, bias)
            rate = 2.0 * rows * cin * cout / (time.perf_counter() - start)
            if rate > best:
                best, where = rate, f"linear {rows}x{cin} -> {cout}"
    return best, where


#: Encoder figures with a ceiling line: label and the project network whose FLOPs torch counts (None: analytic).
CEILING_NETWORKS = {"vit_b": ("ViT-B", None), "mobile_sam": ("MobileSAM", "tiny_vit"),
                    "lite_medsam": ("LiteMedSAM", "lite_tiny_vit")}


def counted_flops(arch: str) -> float:
    """torch's FLOP counter over one pass of the project's ``arch`` encoder (matrix products and convolutions).

    The network runs unfused (torch's counter does not see oneDNN's fused ops) and in one pass
    (TinyViT's strips recompute a row of context per strip: work the network itself does not need)
    on zeros; norms, GELU and softmax are not counted, as in :func:`vit_flops`.
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from napari_medsam.models.networks import fused, tiny_vit
    from napari_medsam.models.networks.sam import build_network

    net = build_network(arch).eval()
    size = int(net.image_size)
    before, rows = fused.ENABLED, tiny_vit._MBCONV_ROWS
    fused.ENABLED, tiny_vit._MBCONV_ROWS = False, None
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            net.image_encoder(torch.zeros(1, 3, size, size))
    finally:
        fused.ENABLED, tiny_vit._MBCONV_ROWS = before, rows
    return float(counter.get_total_flops())


def ceiling_lines(result: FigureResult, rate: tuple[float, str] | None = None) -> list[str]:
    """What an encoder figure's official time allows in float32 on this CPU (printed under the table)."""
    import statistics

    label, arch = CEILING_NETWORKS[result.name]
    flops = vit_flops() if arch is None else counted_flops(arch)
    how = "analytic" if arch is None else "torch's FLOP counter"
    rate, where = rate or float32_matmul_rate()
    floor = flops / rate
    official = statistics.median(result.official_s)
    project = statistics.median(result.project_s)
    size = f"{flops / 1e12:.3f} TFLOP" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP"
    return [
        f"# float32 ceiling, {label}: {size} per slice ({how}: matrix products only); best float32 "
        f"matrix product here {rate / 1e9:.0f} GFLOP/s ({where}, measured now)",
        f"#   every operation at that rate: {floor:.2f} s per slice, so official / project can be at most "
        f"{official / floor:.2f} (official median {official:.2f} s)",
        f"#   the project's encoder runs at {flops / project / 1e9:.0f} GFLOP/s effective: "
        f"{100 * flops / project / rate:.0f} % of that rate",
    ]


# ---------------------------------------------------------------------- peak RSS (subprocesses)
def rss_child(side: str) -> None:
    """In a fresh process: build one side's full ViT-B, encode one slice, print peak RSS in MiB."""
    import torch

    volume, mapping = ct_slice()
    rgb = mapping.to_rgb(volume[0])
    if side == "official":
        ensure_torchvision()
        sa = importlib.import_module("segment_anything")
        predictor = sa.SamPredictor(sa.sam_model_registry["vit_b"](checkpoint=None).eval())
        with torch.no_grad():
            predictor.set_image(rgb, image_format="RGB")
    else:
        from napari_medsam.models.networks.sam import build_network
        from napari_medsam.segment.model import SamModel

        SamModel(build_network("vit_b"), "sam").encode(rgb)
    print(json.dumps({"rss_mib": peak_rss_mib()}))


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB.

    Linux: ``VmHWM`` of /proc/self/status. ``ru_maxrss`` is not used there because exec keeps the
    parent's peak in it: a child started by a 3 GB parent would report at least 3 GB.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_rss(threads: int | None) -> FigureResult:
    result = FigureResult("rss", RSS_FIGURE, unit="MiB")
    values: dict[str, float] = {}
    for side in ("official", "project"):
        cmd = [sys.executable, __file__, "--rss-child", side] + (["--threads", str(threads)] if threads else [])
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            result.skipped = f"{side} side failed: {tail[:160]}"
            return result
        values[side] = json.loads(done.stdout.strip().splitlines()[-1])["rss_mib"]
    result.official_s, result.project_s = [values["official"]], [values["project"]]
    return result


# ---------------------------------------------------------------------- main
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--figures", nargs="+", choices=list(FIGURES), default=list(FIGURES))
    parser.add_argument("--repeats", type=int, default=5, help="timed pairs per encoder figure (x10 for prompts)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--official-src", type=Path, default=os.environ.get(SRC_ENV) or None,
                        help=f"folder with MobileSAM/ and LiteMedSAM/ checkouts (env {SRC_ENV})")
    parser.add_argument("--golden", type=Path, default=Path(os.environ.get(GOLDEN_ENV) or DEFAULT_GOLDEN),
                        help=f"golden checkpoints (env {GOLDEN_ENV}, else ../shared/golden beside the clone)")
    parser.add_argument("--rss", action="store_true", help="also measure peak RSS (two ViT-B subprocesses)")
    parser.add_argument("--json", type=Path, default=None, help="write all figures and raw times here")
    parser.add_argument("--rss-child", choices=("official", "project"), help=argparse.SUPPRESS)
    parser.add_argument("--backend", default="float32", choices=("float32", "bf16", "int8"),
                        help="the project's encoder backend (models/backends.py; default float32, the exact one)")
    parser.add_argument("--compete", type=int, default=0, metavar="N",
                        help="run N single-threaded CPU-heavy processes during the measurement")
    parser.add_argument("--propagation", action="store_true",
                        help="only the 60-slice LiteMedSAM propagation figure (benchmarks/official_propagation.py)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    global PROJECT_BACKEND
    PROJECT_BACKEND = args.backend
    if args.rss_child:
        rss_child(args.rss_child)
        return 0
    if args.propagation:  # three sides (official, project cold, project warm): a table of its own
        with _on_path(Path(__file__).resolve().parent):  # never left on sys.path (tests run main in-process)
            import official_propagation

        return official_propagation.main(args, sys.modules[__name__])
    load_before = os.getloadavg()
    vision = ensure_torchvision()
    print(f"# compare_official: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, torch threads {torch.get_num_threads()}")
    print(f"# torchvision: {vision}")
    print(f"# project encoder backend: {args.backend}; competing processes: {args.compete}")
    print(f"# load average before: {' '.join(f'{v:.2f}' for v in load_before)}", flush=True)
    results: list[FigureResult] = []
    with tempfile.TemporaryDirectory(prefix="compare-official-") as tmp, competing(args.compete):
        ctx = Context(args.repeats, args.golden, args.official_src, Path(tmp))
        for name in args.figures:
            start = time.perf_counter()
            result = run_figure(name, ctx)
            result.load = os.getloadavg()
            state = f"skipped ({result.skipped})" if result.skipped else f"{time.perf_counter() - start:.0f} s"
            print(f"# {name}: {state}; load average {' '.join(f'{v:.2f}' for v in result.load)}", flush=True)
            results.append(result)
    if args.rss:
        results.append(run_rss(args.threads))
        results[-1].load = os.getloadavg()
        print(f"# rss: load average {' '.join(f'{v:.2f}' for v in results[-1].load)}", flush=True)
    load_after = os.getloadavg()
    print()
    print(format_table(results))
    print()
    print(f"# load average after: {' '.join(f'{v:.2f}' for v in load_after)}; torch threads "
          f"{torch.get_num_threads()}")
    encoders = [r for r in results if r.name in CEILING_NETWORKS and not r.skipped and r.official_s]
    # The rate is measured after the run, so only an idle run gives a ceiling that matches its times.
    if encoders and args.backend == "float32" and not args.compete:
        rate = float32_matmul_rate()
        for result in encoders:
            for line in ceiling_lines(result, rate):
                print(line)
    if args.json:
        args.json.write_text(json.dumps({
            "torch": torch.__version__, "threads": torch.get_num_threads(), "torchvision": vision,
            "load_before": load_before, "load_after": load_after,
            "figures": [r.summary() for r in results],
        }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
