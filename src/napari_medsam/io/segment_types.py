"""Segment types: what each label value means (name, colour, coded category and type).

:class:`Code` is a coded concept, :class:`Segment` one label value's description, and
:func:`default_segment` describes a value from its name alone: a name of a known structure (liver,
left kidney, tumour, ...) gets its SNOMED CT category and type from :data:`KNOWN_STRUCTURES`
(DICOM CID 7150 for the category, CID 7151 / 7159 for the type; the values were checked against
``pydicom.sr.codedict.codes.SCT``), any other name "Tissue". JSON and sidecar files of segments
are in :mod:`napari_medsam.io.segments`, which also re-exports every public name of this module.

Only numpy and the standard library are imported here: napari imports this at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import LabelsMismatchError

MAX_LABEL = 65535  # segment numbers are unsigned 16 bit in DICOM


@dataclass(frozen=True)
class Code:
    """A coded concept: (code value, coding scheme designator, code meaning)."""

    value: str
    scheme_designator: str
    meaning: str

    def to_dict(self) -> dict[str, str]:
        """JSON form ``{"value", "scheme", "meaning"}``."""
        return {"value": self.value, "scheme": self.scheme_designator, "meaning": self.meaning}


def _sct(value: str, meaning: str) -> Code:
    return Code(value, "SCT", meaning)


# Segmentation property categories (CID 7150). Current DICOM uses 91723000 for "Anatomical
# Structure"; the older 123037004 means "Body structure" in SNOMED CT. Types come from CID 7151
# (segmentation property types), 7166 (tissue types) and 7159 (lesion types).
ANATOMICAL_STRUCTURE = _sct("91723000", "Anatomical Structure")
ABNORMAL_STRUCTURE = _sct("49755003", "Morphologically Abnormal Structure")
TISSUE = _sct("85756007", "Tissue")
BODY_SUBSTANCE = _sct("91720002", "Body Substance")
LEFT = _sct("7771000", "Left")
RIGHT = _sct("24028007", "Right")


@dataclass(frozen=True)
class KnownStructure:
    """Codes (and a conventional colour) for a structure name napari-medsam recognises."""

    category: Code
    type: Code
    color: tuple[int, int, int] | None = None
    modifier: Code | None = None


RGB = tuple[int, int, int]


def _organ(value: str, meaning: str, color: RGB | None = None, modifier: Code | None = None) -> KnownStructure:
    return KnownStructure(ANATOMICAL_STRUCTURE, _sct(value, meaning), color, modifier)


def _tissue(value: str, meaning: str, color: RGB | None = None) -> KnownStructure:
    return KnownStructure(TISSUE, _sct(value, meaning), color)


def _abnormal(value: str, meaning: str, color: RGB | None = None) -> KnownStructure:
    return KnownStructure(ABNORMAL_STRUCTURE, _sct(value, meaning), color)


_KIDNEY = ("64033007", "Kidney", (185, 95, 75))
_LUNG = ("39607008", "Lung", (170, 200, 230))
_VERTEBRA = ("51282000", "Vertebra", (235, 215, 160))

# Keys are normalised names (lower case, single spaces); see _normalise.
KNOWN_STRUCTURES: dict[str, KnownStructure] = {
    "liver": _organ("10200004", "Liver", (190, 95, 65)),
    "spleen": _organ("78961009", "Spleen", (150, 100, 160)),
    "kidney": _organ(*_KIDNEY),
    "left kidney": _organ(*_KIDNEY, modifier=LEFT),
    "right kidney": _organ(*_KIDNEY, modifier=RIGHT),
    "aorta": _organ("15825003", "Aorta", (220, 60, 60)),
    "vertebra": _organ(*_VERTEBRA),
    "spine": _organ("421060004", "Spine", (235, 215, 160)),
    "bone": _tissue("3138006", "Bone", (240, 225, 190)),
    "lung": _organ(*_LUNG),
    "left lung": _organ(*_LUNG, modifier=LEFT),
    "right lung": _organ(*_LUNG, modifier=RIGHT),
    "heart": _organ("80891009", "Heart", (200, 70, 80)),
    "pancreas": _organ("15776009", "Pancreas", (245, 180, 110)),
    "stomach": _organ("69695003", "Stomach", (215, 135, 110)),
    "bladder": _organ("89837001", "Bladder", (225, 190, 90)),
    "prostate": _organ("41216001", "Prostate", (215, 150, 175)),
    "brain": _organ("12738006", "Brain", (240, 230, 210)),
    "white matter": _tissue("389080008", "White Matter", (245, 245, 235)),
    "grey matter": _tissue("389081007", "Gray Matter", (130, 130, 150)),
    "ventricle": _organ("35764002", "Brain ventricle", (80, 110, 210)),
    "lateral ventricle": _organ("66720007", "Lateral Ventricle", (80, 110, 210)),
    "fat": _tissue("55603005", "Fat", (230, 215, 90)),
    "muscle": _tissue("91727004", "Muscle", (180, 80, 70)),
    "body": _organ("38266002", "Entire body", (200, 180, 160)),
    "gallbladder": _organ("28231008", "Gallbladder", (100, 160, 60)),
    "esophagus": _organ("32849002", "Esophagus", (210, 150, 130)),
    "colon": _organ("71854001", "Colon", (200, 150, 100)),
    "small intestine": _organ("30315005", "Small intestine", (220, 170, 120)),
    "duodenum": _organ("38848004", "Duodenum", (225, 160, 110)),
    "trachea": _organ("44567001", "Trachea", (180, 220, 230)),
    "adrenal gland": _organ("23451007", "Adrenal gland", (235, 170, 70)),
    "inferior vena cava": _organ("64131007", "Inferior vena cava", (60, 90, 200)),
    "portal vein": _organ("32764006", "Portal vein", (90, 110, 210)),
    "spinal cord": _organ("2748008", "Spinal cord", (250, 240, 130)),
    "rib": _organ("113197003", "Rib", (235, 215, 160)),
    "femur": _organ("71341001", "Femur", (235, 215, 160)),
    "skull": _organ("89546000", "Skull", (235, 215, 160)),
    "thyroid": _organ("69748006", "Thyroid", (200, 110, 120)),
    "cerebellum": _organ("113305005", "Cerebellum", (220, 200, 170)),
    "brain stem": _organ("119238007", "Brain Stem", (210, 180, 150)),
    "uterus": _organ("35039007", "Uterus", (210, 130, 150)),
    "rectum": _organ("34402009", "Rectum", (190, 130, 100)),
    "skin": _organ("39937001", "Skin", (240, 200, 170)),
    "lymph node": _organ("59441001", "Lymph Node", (120, 200, 120)),
    "breast": _organ("76752008", "Breast", (240, 190, 190)),
    "csf": KnownStructure(BODY_SUBSTANCE, _sct("65216001", "Cerebrospinal Fluid"), (120, 170, 240)),
    "soft tissue": _tissue("87784001", "Soft tissue", (210, 160, 140)),
    "tumor": _abnormal("108369006", "Neoplasm", (80, 220, 80)),
    "lesion": _abnormal("52988006", "Lesion", (255, 140, 0)),
    "mass": _abnormal("4147007", "Mass", (255, 90, 200)),
    "nodule": _abnormal("27925004", "Nodule", (255, 200, 0)),
    "metastasis": _abnormal("14799000", "Neoplasm, Secondary", (255, 60, 30)),
    "cyst": _abnormal("367643001", "Cyst", (90, 200, 255)),
    "edema": _abnormal("79654002", "Edema", (120, 230, 230)),
    "necrosis": _abnormal("6574001", "Necrosis", (120, 80, 60)),
    "hemorrhage": _abnormal("50960005", "Hemorrhage", (170, 0, 0)),
    "thrombus": _abnormal("396339007", "Thrombus", (130, 20, 40)),
}

_SYNONYMS = {
    "tumour": "tumor", "neoplasm": "tumor", "cancer": "tumor", "carcinoma": "tumor",
    "lungs": "lung", "kidneys": "kidney", "vertebrae": "vertebra", "spinal column": "spine",
    "vertebral column": "spine", "bones": "bone", "urinary bladder": "bladder",
    "gray matter": "grey matter", "wm": "white matter", "gm": "grey matter",
    "ventricles": "ventricle", "adipose tissue": "fat", "adipose": "fat",
    "skeletal muscle": "muscle", "muscles": "muscle", "entire body": "body", "whole body": "body",
    "patient": "body", "lesions": "lesion", "masses": "mass", "nodules": "nodule",
    "metastases": "metastasis", "cysts": "cyst", "oedema": "edema", "haemorrhage": "hemorrhage",
    "bleed": "hemorrhage", "oesophagus": "esophagus", "ivc": "inferior vena cava",
    "brainstem": "brain stem", "thyroid gland": "thyroid", "ribs": "rib",
    "cerebrospinal fluid": "csf", "gall bladder": "gallbladder", "adrenal": "adrenal gland",
    "l kidney": "left kidney", "r kidney": "right kidney", "kidney left": "left kidney",
    "kidney right": "right kidney", "lung left": "left lung", "lung right": "right lung",
    "l lung": "left lung", "r lung": "right lung", "kidney l": "left kidney",
    "kidney r": "right kidney", "lung l": "left lung", "lung r": "right lung",
    "vertebral body": "vertebra", "vertebral bodies": "vertebra", "tumors": "tumor", "tumours": "tumor",
    "neoplasms": "tumor", "cancers": "tumor", "carcinomas": "tumor", "hepatic": "liver",
    "renal": "kidney", "splenic": "spleen", "aortic": "aorta", "pulmonary": "lung",
}

# Words that name a side; the structure found in the rest of the name gets that laterality.
_SIDES = {"left": LEFT, "l": LEFT, "lt": LEFT, "right": RIGHT, "r": RIGHT, "rt": RIGHT}
# Paired structures: only these take a Left/Right modifier from the name.
_PAIRED = {"kidney", "lung", "adrenal gland", "femur", "rib", "breast", "lateral ventricle"}

# Lesion words win over organ words in a compound name ("liver tumour" is a tumour).
_ABNORMAL_KEYS = tuple(k for k, v in KNOWN_STRUCTURES.items() if v.category == ABNORMAL_STRUCTURE)

# A fixed palette of well separated colours, indexed by label value (label 1 -> first entry).
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 60, 60), (60, 180, 75), (70, 130, 240), (255, 200, 30), (170, 80, 200),
    (70, 220, 220), (240, 110, 190), (160, 210, 60), (250, 150, 60), (0, 128, 128),
    (200, 160, 255), (150, 90, 40), (255, 240, 180), (128, 0, 0), (160, 255, 190),
    (128, 128, 0), (255, 190, 160), (0, 0, 140), (128, 128, 128), (240, 240, 240),
)


@dataclass(frozen=True)
class Segment:
    """What one label value means: name, display colour and SNOMED CT category/type codes."""

    label: int
    name: str
    color: tuple[int, int, int]
    category: Code
    type: Code
    type_modifier: Code | None = None

    def __post_init__(self) -> None:
        label = _as_label(self.label)
        if not str(self.name).strip():
            raise ValueError(f"segment {label} needs a non-empty name")
        object.__setattr__(self, "label", label)
        object.__setattr__(self, "name", str(self.name).strip())
        object.__setattr__(self, "color", as_color(self.color))

    def to_dict(self) -> dict[str, Any]:
        """JSON form of this segment."""
        out: dict[str, Any] = {
            "label": self.label,
            "name": self.name,
            "color": list(self.color),
            "category": self.category.to_dict(),
            "type": self.type.to_dict(),
        }
        if self.type_modifier is not None:
            out["type_modifier"] = self.type_modifier.to_dict()
        return out


def _as_label(value: Any) -> int:
    if isinstance(value, bool) or not float(value).is_integer():
        raise ValueError(f"segment label must be an integer, got {value!r}")
    label = int(value)
    if not 1 <= label <= MAX_LABEL:
        raise ValueError(f"segment label must be between 1 and {MAX_LABEL}, got {label}")
    return label


def as_color(value: Any) -> tuple[int, int, int]:
    """(r, g, b) 0-255 from a '#rrggbb' string or three integers; ValueError otherwise."""
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if not re.fullmatch(r"[0-9a-fA-F]{6}", text):
            raise ValueError(f"colour {value!r} is not '#rrggbb'")
        return (int(text[0:2], 16), int(text[2:4], 16), int(text[4:6], 16))
    parts = tuple(value)
    if len(parts) != 3 or any(
        isinstance(p, bool) or not float(p).is_integer() or not 0 <= int(p) <= 255 for p in parts
    ):
        raise ValueError(f"colour must be three integers 0-255 (r, g, b), got {value!r}")
    return tuple(int(p) for p in parts)  # type: ignore[return-value]


def _normalise(name: str) -> str:
    return " ".join(re.sub(r"[_\-./,]+", " ", name.lower()).split())


def _singular(word: str) -> str:
    """``word`` itself when known, else its synonym, else a known singular of an English plural."""
    if word in KNOWN_STRUCTURES or word in _SIDES:
        return word
    if word in _SYNONYMS:
        return _SYNONYMS[word]
    for ending, replacement in (("ies", "y"), ("es", ""), ("s", "")):
        if len(word) > len(ending) + 2 and word.endswith(ending):
            stem = word[: -len(ending)] + replacement
            if stem in KNOWN_STRUCTURES or stem in _SYNONYMS:
                return _SYNONYMS.get(stem, stem)
    return word


def lookup_structure(name: str) -> KnownStructure | None:
    """The coded structure a free-text name refers to, or None when it is not recognised.

    Case, separators (``_ - . /``), plurals and common synonyms ("tumour", "lesions", "renal")
    do not matter; a lesion word wins over an organ word ("liver tumour" is a tumour); a side word
    (left/right, L/R) gives a paired organ its laterality ("Kidney_R", "lungs left").
    """
    key = _normalise(name)
    key = _SYNONYMS.get(key, key)
    if key in KNOWN_STRUCTURES:
        return KNOWN_STRUCTURES[key]
    words = [_singular(w) for w in key.split()]
    joined = " ".join(words)
    joined = _SYNONYMS.get(joined, joined)
    if joined in KNOWN_STRUCTURES:
        return KNOWN_STRUCTURES[joined]
    text = f" {joined} "
    for abnormal in _ABNORMAL_KEYS:
        if f" {abnormal} " in text:
            return KNOWN_STRUCTURES[abnormal]
    sides = {_SIDES[w] for w in words if w in _SIDES}
    rest = " " + " ".join(w for w in words if w not in _SIDES) + " "
    # Longest match first so "small intestine wall" finds "small intestine", not a shorter key.
    for known in sorted(KNOWN_STRUCTURES, key=len, reverse=True):
        if f" {known} " in rest:
            found = KNOWN_STRUCTURES[known]
            if len(sides) == 1 and known in _PAIRED and found.modifier is None:
                return KnownStructure(found.category, found.type, found.color, sides.pop())
            return found
    return None


def palette_color(label: int) -> tuple[int, int, int]:
    """The default colour of a label value."""
    return PALETTE[(int(label) - 1) % len(PALETTE)]


def default_segment(label: int, name: str | None = None, color: Any = None) -> Segment:
    """A segment for ``label`` with codes (and colour) guessed from its name; unknown -> Tissue."""
    label = _as_label(label)
    name = name.strip() if name and name.strip() else f"Segment {label}"
    known = lookup_structure(name)
    if known is None:
        return Segment(label, name, color if color is not None else palette_color(label), TISSUE, TISSUE)
    if color is None:
        color = known.color if known.color is not None else palette_color(label)
    return Segment(label, name, color, known.category, known.type, known.modifier)


def present_labels(labels: np.ndarray) -> list[int]:
    """Sorted non-zero values in an integer label array (LabelsMismatchError if not valid labels)."""
    labels = np.asarray(labels)
    if labels.dtype == bool:
        return [1] if labels.any() else []
    if not np.issubdtype(labels.dtype, np.integer):
        if not np.issubdtype(labels.dtype, np.floating) or not np.all(np.mod(labels, 1) == 0):
            raise LabelsMismatchError(
                f"Label values must be whole numbers; this array has dtype {labels.dtype} with "
                "fractional values. Round or convert the labels to integers first."
            )
    if labels.size == 0:
        return []
    low, high = labels.min(), labels.max()
    if low < 0:
        raise LabelsMismatchError(f"Label values must not be negative (found {low}). Fix the labels first.")
    if high > MAX_LABEL:
        raise LabelsMismatchError(
            f"Label values must be at most {MAX_LABEL} (found {high}). Relabel with smaller values."
        )
    if labels.ndim >= 2 and high > 0:
        # Per-slice bincount: far faster and lighter than np.unique on large volumes.
        counts = np.zeros(int(high) + 1, dtype=np.int64)
        for plane in labels.reshape(labels.shape[0], -1):
            counts += np.bincount(plane.astype(np.intp), minlength=counts.size)
        return [int(v) for v in np.flatnonzero(counts[1:]) + 1]
    return [int(v) for v in np.unique(labels) if v != 0]


def segments_for_labels(
    labels: np.ndarray,
    names: dict[int, str] | None = None,
    overrides: list[Segment] | None = None,
) -> list[Segment]:
    """One segment per non-zero value present in ``labels``: an override if given, else a default."""
    given = {s.label: s for s in overrides or []}
    names = names or {}
    return [given.get(v) or default_segment(v, names.get(v)) for v in present_labels(labels)]
