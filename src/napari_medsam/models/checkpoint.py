"""Safe loading of weight files and checks that they fit the chosen network.

Weight files are opened with ``torch.load(..., weights_only=True)`` only: a checkpoint is a
pickle, and a general unpickler runs whatever code the file names. The restricted loader
accepts tensors, plain containers and numbers and refuses everything else.

Both network families go through :func:`load_network`: SAM 1 architectures are built by
:mod:`napari_medsam.models.networks.sam`, SAM 2 ones (Hiera: SAM 2.1, MedSAM2) by
:mod:`napari_medsam.models.networks.sam2.model`. Official SAM 2 files are ``{"model": state_dict}``,
which the common unwrapping handles. Before building, the file's keys and shapes are compared with
the chosen architecture; on a mismatch the error names the known model the file resembles (a SAM 1
file offered as MedSAM2, a 512-px MedSAM2 file offered as SAM 2.1 Large, ...).

torch is imported inside the functions so that :mod:`napari_medsam.models.weights` (which
uses :class:`WeightsError` and :func:`describe_non_checkpoint`) stays light.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import MedSamError, WeightsError
from .registry import SAM2_ARCHITECTURE_NAMES, ModelSpec, get_model, list_models

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn

__all__ = [
    "WeightsError",
    "check_architecture",
    "describe_non_checkpoint",
    "expected_state",
    "load_network",
    "load_state_dict",
]

_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "model_state")
_KEY_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DDP and torch.compile wrappers
_SHOW = 5  # how many example keys an error message lists



def describe_non_checkpoint(head: bytes) -> str | None:
    """Why the first bytes of a file show it is not a PyTorch checkpoint, or None if it may be one."""
    if not head:
        return "the file is empty"
    stripped = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if stripped.startswith(b"<"):
        return (
            "this looks like an HTML page: the download was probably a login, quota or "
            "virus-scan page instead of the checkpoint"
        )
    # torch.save writes a zip archive (PK) since 1.6 and a protocol-2 pickle (0x80) before.
    if head.startswith(b"PK\x03\x04") or head.startswith(b"\x80"):
        return None
    if stripped.startswith((b"{", b"[")):
        return "this looks like a JSON/text file, not a PyTorch checkpoint"
    return "the file is not a PyTorch checkpoint (it is neither a zip archive nor a pickle)"


def _read_head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(64)


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint's tensors on the CPU without running code from the file."""
    import pickle

    import torch

    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    try:
        head = _read_head(path)
    except OSError as exc:
        raise WeightsError(f"cannot read the weight file {path}: {exc.strerror or exc}") from exc
    problem = describe_non_checkpoint(head)
    if problem:
        raise WeightsError(f"{path}: {problem}. Download the weights again or choose another file.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower():
            detail = next(
                (line.strip() for line in str(exc).splitlines() if "Unsupported" in line), ""
            )
            raise WeightsError(
                f"refused to load {path}: it contains Python objects other than tensors, which "
                "could run code when unpickled" + (f" ({detail})" if detail else "")
                + ". napari-medsam only loads plain weight files (state dicts); use the official "
                "checkpoint, or re-save a trusted file with torch.save(model.state_dict(), path)."
            ) from exc
        raise WeightsError(f"{path} is corrupt (pickle error: {exc}); download it again.") from exc
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        size = path.stat().st_size
        raise WeightsError(
            f"{path} ({size:,} bytes) could not be read as a PyTorch checkpoint ({first}). The file "
            "is probably truncated or corrupt (an interrupted download?); delete it and download "
            "it again."
        ) from exc
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    import torch

    for _ in range(3):  # e.g. {"model": {"state_dict": ...}}
        if not isinstance(obj, Mapping):
            break
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(
            f"{path} holds no weights (found {type(obj).__name__}); expected a state dict of tensors"
        )
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(
            f"{path} is not a plain state dict: {len(bad)} entries are not tensors "
            f"(e.g. {', '.join(map(str, bad[:_SHOW]))})"
        )
    state = {str(k): v for k, v in obj.items()}
    for prefix in _KEY_PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _options_key(options: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    return tuple(
        sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in options.items())
    )


def _builder(arch: str) -> Any:
    """The function that builds ``arch`` without weights: SAM 2 or SAM 1 family."""
    if arch in SAM2_ARCHITECTURE_NAMES:
        from .networks.sam2.model import build_sam2

        return build_sam2
    from .networks import build_network

    return build_network


@lru_cache(maxsize=16)
def _expected_cached(arch: str, options: tuple[tuple[str, Any], ...]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    import torch

    build = _builder(arch)
    # On the meta device nothing is allocated, so even ViT-H costs milliseconds.
    with torch.device("meta"):
        net = build(arch, **dict(options))
    return tuple((k, tuple(v.shape)) for k, v in net.state_dict().items())


def expected_state(arch: str, **options: Any) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes of ``build_network(arch, **options)``, in order."""
    return dict(_expected_cached(arch, _options_key(options)))


def _shapes(state: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in state.items()}


def _encoder_keys(shapes: Mapping[str, tuple[int, ...]]) -> set[tuple[str, tuple[int, ...]]]:
    # The prompt encoder and mask decoder are the same in every model of a family, so only the
    # image encoder tells the models apart (SAM 1 and SAM 2 encoders share no key at all:
    # ``image_encoder.patch_embed.*`` versus ``image_encoder.trunk.*``/``image_encoder.neck.*``).
    items = {(k, s) for k, s in shapes.items() if k.startswith("image_encoder.")}
    return items or set(shapes.items())


def _layout_groups() -> list[tuple[str, list[str], frozenset[tuple[str, tuple[int, ...]]]]]:
    """Registry architectures grouped by identical image-encoder layout: (first arch, display names, layout).

    SAM 2.1 Tiny (1024 px) and MedSAM2 (512 px) have the same weights layout, as do SAM ViT-B and
    MedSAM: such files cannot be told apart, so a hint names every model of the group.
    """
    groups: list[tuple[str, list[str], frozenset[tuple[str, tuple[int, ...]]]]] = []
    for spec in list_models():
        try:
            layout = frozenset(_encoder_keys(expected_state(spec.architecture)))
        except Exception:  # a family whose builder is unavailable gives no hint; the others still do
            continue
        for _arch, names, known in groups:
            if known == layout:
                if spec.display_name not in names:
                    names.append(spec.display_name)
                break
        else:
            groups.append((spec.architecture, [spec.display_name], layout))
    return groups


def _closest(shapes: Mapping[str, tuple[int, ...]]) -> tuple[str, str, float, bool] | None:
    """The registry architecture nearest to ``shapes``: (arch, display names, share of the
    file's image-encoder entries it explains, exact match)."""
    try:
        found = _encoder_keys(shapes)
        best: tuple[tuple[float, float], tuple[str, str, float, bool]] | None = None
        for arch, arch_names, ref in _layout_groups():
            common = len(found & ref)
            share = common / max(len(found), 1)
            rank = (share, common / max(len(found | ref), 1))
            if best is None or rank > best[0]:
                best = (rank, (arch, " / ".join(arch_names), share, found == ref))
        return None if best is None else best[1]
    except Exception:  # the hint is a courtesy; never hide the real error behind a builder failure
        return None


def check_architecture(
    state_dict: Mapping[str, Any], expected: Mapping[str, tuple[int, ...]], model_name: str
) -> None:
    """Raise :class:`WeightsError` unless ``state_dict`` has exactly the expected keys and shapes."""
    found = _shapes(state_dict)
    want = {k: tuple(v) for k, v in expected.items()}
    missing = [k for k in want if k not in found]
    unexpected = [k for k in found if k not in want]
    misshaped = [k for k in want if k in found and found[k] != want[k]]
    if not (missing or unexpected or misshaped):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:_SHOW])})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:_SHOW])})")
    if misshaped:
        shown = ", ".join(f"{k} {list(found[k])} instead of {list(want[k])}" for k in misshaped[:_SHOW])
        parts.append(f"{len(misshaped)} with the wrong shape (e.g. {shown})")
    details = " Details: " + "; ".join(parts) + "."
    message = f"these weights do not fit {model_name}."
    guess = _closest(found)
    wanted = _closest(want)
    same_family = wanted is not None and guess is not None and wanted[0] == guess[0] and wanted[3]
    if guess is not None and guess[3] and not same_family:
        message += f" This file looks like a {guess[1]} checkpoint, not {model_name}; choose that model."
    elif guess is not None and guess[2] >= 0.5:
        message += (
            f" Its image encoder is closest to {guess[1]} ({guess[2]:.0%} of its weights match), "
            "but it is not a standard checkpoint of any model napari-medsam knows."
        )
    else:
        message += " It does not look like a checkpoint of any model napari-medsam knows."
    message += details
    raise WeightsError(message)


def load_network(spec_or_name: str | ModelSpec, path: str | Path, device: Any = "cpu") -> nn.Module:
    """Build the spec's network, load ``path`` into it strictly, and return it in eval mode on ``device``."""
    from .device import resolve_device
    from .networks import sam as sam_networks

    spec = get_model(spec_or_name)
    target = resolve_device(device)
    state = load_state_dict(path)
    check_architecture(state, expected_state(spec.architecture, **spec.build_options), spec.display_name)
    try:
        if spec.family == "sam2":
            from .networks.sam2.model import load_sam2

            net = load_sam2(spec.architecture, state, **spec.build_options)
        else:
            net = sam_networks.load_network(spec.architecture, state, **spec.build_options)
    except MedSamError as exc:  # keys and shapes matched, so this is e.g. a dtype problem
        raise WeightsError(f"{path}: {exc}") from exc
    return net.to(target).eval()
