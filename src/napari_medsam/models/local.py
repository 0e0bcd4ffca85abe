"""The user's own models: fine-tuned checkpoints registered in a folder of small JSON files.

A fine-tuned checkpoint lives wherever the user saved it; registering it writes
``<models folder>/<name>.json`` naming the base model and the checkpoint file. The registry
(:func:`napari_medsam.models.registry.list_models` / ``get_model``) reads this folder each time it
is asked, so a model saved by the CLI appears in napari's model chooser and the other way round.
A local model is its base model's :class:`ModelSpec` with another name, its own file as the only
"URL" and ``local_path`` set, so the weight lookup uses the file where it is and never downloads.

Folder: ``$NAPARI_MEDSAM_MODELS_DIR``, else ``platformdirs.user_data_dir("napari-medsam")/models``
(user data rather than the weight cache: a cache may be emptied, the user's models must stay).
No torch here: the UI reads this at start-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

import platformdirs

__all__ = ["ENV_VAR", "local_specs", "models_dir", "register_local_model", "safe_name"]

ENV_VAR = "NAPARI_MEDSAM_MODELS_DIR"
KIND = "napari-medsam fine-tuned model"


def models_dir() -> Path:
    """The folder of registered local models."""
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_data_dir("napari-medsam")) / "models"


def safe_name(text: str) -> str:
    """A registry name from free text: letters, digits, ``_``, ``-`` and ``.``."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")
    return name or "tuned"


def register_local_model(name: str, base: str, checkpoint: str | os.PathLike[str], info: dict[str, Any],
                         folder: str | os.PathLike[str] | None = None) -> Path:
    """Write the registration ``<folder>/<name>.json`` (atomically) and return its path."""
    target_dir = Path(folder) if folder is not None else models_dir()
    target_dir.mkdir(parents=True, exist_ok=True)
    record = {"kind": KIND, "name": name, "base_model": base,
              "checkpoint": str(Path(checkpoint).expanduser().resolve()), **info}
    path = target_dir / f"{safe_name(name)}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(tmp, path)
    return path


def local_specs(builtin: dict[str, Any]) -> list[Any]:
    """ModelSpecs of the registered local models whose base is a built-in model (bad files are skipped)."""
    folder = models_dir()
    try:
        files = sorted(folder.glob("*.json"))
    except OSError:
        return []
    specs = []
    for path in files:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
            if record.get("kind") != KIND or record.get("base_model") not in builtin:
                continue
            base = builtin[record["base_model"]]
            name = safe_name(str(record.get("name") or path.stem))
            if name in builtin:
                continue
            checkpoint = Path(record["checkpoint"])
            dice = record.get("dice_after")
            score = f", held-out Dice {float(dice):.2f}" if isinstance(dice, (int, float)) else ""
            specs.append(dataclasses.replace(
                base, name=name, display_name=f"{name} (tuned {base.display_name})",
                urls=(checkpoint.as_uri(),), filename=checkpoint.name, size_bytes=None, sha256=None,
                notes=f"Fine-tuned from {base.display_name} on your labels{score}; file {checkpoint}.",
                local_path=str(checkpoint),
            ))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return specs
