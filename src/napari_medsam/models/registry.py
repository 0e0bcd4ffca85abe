"""The models napari-medsam knows: what each one is, where its weights come from, how to run it.

This module is read by the UI at start-up to fill the model chooser, so it imports nothing
heavy (no torch). Download and caching live in :mod:`napari_medsam.models.weights`, safe
loading and architecture checks in :mod:`napari_medsam.models.checkpoint`.

Checksums: a ``sha256`` is recorded only where the same value for the same file was found in
several independent public sources (none of the upstream projects publishes a SHA-256
itself; Zenodo publishes an MD5 for MedSAM). Where no such value was found the
field is ``None`` and the hash of the downloaded file is only recorded, not checked. The hex
suffix in Meta's file names (``..._01ec64``) is *not* a prefix of the file's SHA-256 and is
not used as a check. The SAM 2.1 files have a SHA-256 published by Git LFS on Meta's Hugging Face
repositories and repeated by independent mirrors; MedSAM2's has none we could find. See
docs/models.md for the provenance of every value.

Two families share this table: ``"sam"`` (SAM 1 image encoder + prompt encoder + mask decoder:
SAM, MedSAM, MobileSAM, LiteMedSAM) and ``"sam2"`` (SAM 2.1's Hiera encoder with memory
modules: SAM 2.1 Tiny/Small/Base+/Large and MedSAM2). ``ModelSpec.family`` says which.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import MedSamError

__all__ = [
    "ARCHITECTURE_NAMES",
    "SAM2_ARCHITECTURE_NAMES",
    "MODELS",
    "PIPELINE_NAMES",
    "ModelSpec",
    "get_model",
    "list_models",
    "recommended_model",
]

# Mirrors napari_medsam.models.networks.sam2.model.SAM2_ARCHITECTURES without importing torch.
SAM2_ARCHITECTURE_NAMES: tuple[str, ...] = ("hiera_t", "hiera_s", "hiera_b+", "hiera_l", "hiera_t512")
# Mirrors napari_medsam.models.networks.ARCHITECTURES (SAM 1) plus the SAM 2 ones.
ARCHITECTURE_NAMES: tuple[str, ...] = (
    "vit_b", "vit_l", "vit_h", "tiny_vit", "lite_tiny_vit", *SAM2_ARCHITECTURE_NAMES
)
# The official pre/post-processing families (napari_medsam.models.pipelines).
PIPELINE_NAMES: tuple[str, ...] = ("sam", "medsam", "lite_medsam", "sam2", "medsam2")
_SAM2_PIPELINES = ("sam2", "medsam2")
_INPUT_SIZE = {
    "vit_b": 1024, "vit_l": 1024, "vit_h": 1024, "tiny_vit": 1024, "lite_tiny_vit": 256,
    "hiera_t": 1024, "hiera_s": 1024, "hiera_b+": 1024, "hiera_l": 1024, "hiera_t512": 512,
}


def _check_download_fields(spec: Any) -> None:
    """The checks every downloadable file's entry passes: URLs given, a well-formed SHA-256, a bare file name."""
    if not spec.urls:
        raise ValueError(f"{spec.name}: at least one download URL is needed")
    if spec.sha256 is not None and (len(spec.sha256) != 64 or any(c not in "0123456789abcdef" for c in spec.sha256)):
        raise ValueError(f"{spec.name}: sha256 must be 64 lower-case hex digits")
    if "/" in spec.filename or "\\" in spec.filename or not spec.filename:
        raise ValueError(f"{spec.name}: filename must be a bare file name")


@dataclass(frozen=True)
class ModelSpec:
    """One downloadable model: its network, its pipeline and its official weight file."""

    name: str
    display_name: str
    architecture: str
    input_size: int
    pipeline: str
    urls: tuple[str, ...]
    filename: str
    size_bytes: int | None
    sha256: str | None
    license: str
    citation: str
    homepage: str
    notes: str = ""
    # Builder overrides for non-standard variants (e.g. the reduced depth-2 ViT-B test model),
    # as (name, value) pairs so the spec stays hashable.
    arch_options: tuple[tuple[str, Any], ...] = field(default=())
    # A user's own model (a fine-tuned checkpoint, models/local.py): its file, used where it is.
    local_path: str | None = None

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURE_NAMES:
            raise ValueError(f"{self.name}: unknown architecture {self.architecture!r}")
        if self.pipeline not in PIPELINE_NAMES:
            raise ValueError(f"{self.name}: unknown pipeline {self.pipeline!r}")
        if (self.pipeline in _SAM2_PIPELINES) != (self.architecture in SAM2_ARCHITECTURE_NAMES):
            raise ValueError(
                f"{self.name}: pipeline {self.pipeline!r} does not fit the {self.architecture} network "
                "(SAM 2 networks take the 'sam2'/'medsam2' pipelines, SAM 1 networks the others)"
            )
        if self.input_size != _INPUT_SIZE[self.architecture]:
            raise ValueError(
                f"{self.name}: {self.architecture} takes {_INPUT_SIZE[self.architecture]} px input, "
                f"not {self.input_size}"
            )
        _check_download_fields(self)

    @property
    def family(self) -> str:
        """``"sam2"`` for the SAM 2 networks (Hiera encoder, memory modules), ``"sam"`` otherwise."""
        return "sam2" if self.architecture in SAM2_ARCHITECTURE_NAMES else "sam"

    @property
    def build_options(self) -> dict[str, Any]:
        """Keyword overrides for ``build_network(self.architecture, **options)``."""
        return dict(self.arch_options)


_SAM_LICENSE = "Apache-2.0"
_SAM_CITATION = (
    "Kirillov A. et al. Segment Anything. ICCV 2023. arXiv:2304.02643"
)
_SAM_HOME = "https://github.com/facebookresearch/segment-anything"
_MEDSAM_CITATION = (
    "Ma J., He Y., Li F., Han L., You C., Wang B. Segment anything in medical images. "
    "Nature Communications 15, 654 (2024). doi:10.1038/s41467-024-44824-z"
)
_GDRIVE = "https://drive.usercontent.google.com/download?id={}&export=download&confirm=t"
_SAM2_LICENSE = "Apache-2.0"
_SAM2_CITATION = (
    "Ravi N. et al. SAM 2: Segment Anything in Images and Videos. ICLR 2025. arXiv:2408.00714"
)
_SAM2_HOME = "https://github.com/facebookresearch/sam2"
_SAM2_BASE = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"
_SAM2_HF = "https://huggingface.co/facebook/sam2.1-hiera-{}/resolve/main/{}"
_SAM2_NOTES = (
    "Meta's SAM 2.1 ({}, {} parameters), natural images and videos; here it segments one slice at a "
    "time from points or a box (input stretched to 1024x1024). {}"
)


def _sam2_spec(size: str, arch: str, display: str, params: str, nbytes: int, sha256: str, extra: str) -> ModelSpec:
    filename = f"sam2.1_hiera_{size}.pt"
    return ModelSpec(
        name=f"sam2.1_hiera_{size}",
        display_name=f"SAM 2.1 {display}",
        architecture=arch,
        input_size=1024,
        pipeline="sam2",
        # Meta's download server (the links of the sam2 README and checkpoints/download_ckpts.sh),
        # then Meta's own Hugging Face repository of the same file.
        urls=(_SAM2_BASE + filename, _SAM2_HF.format(size.replace("_", "-"), filename)),
        filename=filename,
        size_bytes=nbytes,
        sha256=sha256,
        license=_SAM2_LICENSE,
        citation=_SAM2_CITATION,
        homepage=_SAM2_HOME,
        notes=_SAM2_NOTES.format(f"Hiera-{display}", params, extra).strip(),
    )

_SPECS: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="sam_vit_b",
        display_name="SAM ViT-B",
        architecture="vit_b",
        input_size=1024,
        pipeline="sam",
        urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",),
        filename="sam_vit_b_01ec64.pth",
        size_bytes=375_042_383,
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        license=_SAM_LICENSE,
        citation=_SAM_CITATION,
        homepage=_SAM_HOME,
        notes="Meta's general-purpose SAM, smallest ViT (91M parameters). Points and boxes. "
        "Best on a GPU; on a 2-core CPU this plugin embeds a slice in about 5 s (docs/performance.md).",
    ),
    ModelSpec(
        name="sam_vit_l",
        display_name="SAM ViT-L",
        architecture="vit_l",
        input_size=1024,
        pipeline="sam",
        urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_l_0b3195.pth",),
        filename="sam_vit_l_0b3195.pth",
        size_bytes=1_249_524_607,
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
        license=_SAM_LICENSE,
        citation=_SAM_CITATION,
        homepage=_SAM_HOME,
        notes="Meta's SAM with the ViT-L encoder (308M parameters); GPU only in practice (about 16 s "
        "per slice on a 2-core CPU in this plugin, docs/performance.md).",
    ),
    ModelSpec(
        name="sam_vit_h",
        display_name="SAM ViT-H",
        architecture="vit_h",
        input_size=1024,
        pipeline="sam",
        urls=("https://dl.fbaipublicfiles.com/segment_anything/sam_vit_h_4b8939.pth",),
        filename="sam_vit_h_4b8939.pth",
        size_bytes=2_564_550_879,
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
        license=_SAM_LICENSE,
        citation=_SAM_CITATION,
        homepage=_SAM_HOME,
        notes="Meta's largest SAM (636M parameters), the most accurate on natural images; "
        "needs a GPU with several GB of memory (about 32 s per slice on a 2-core CPU in this plugin).",
    ),
    ModelSpec(
        name="medsam",
        display_name="MedSAM ViT-B",
        architecture="vit_b",
        input_size=1024,
        pipeline="medsam",
        urls=(
            "https://zenodo.org/records/10689643/files/medsam_vit_b.pth?download=1",
            _GDRIVE.format("1UAmWL88roYR7wKlnApw5Bcuzf2iQgk6_"),
        ),
        filename="medsam_vit_b.pth",
        size_bytes=375_049_145,
        sha256="34b34b78c1d18cb8c6bf84cf9c00e135d6d6c965699f3c0e31ef1bc9dcb5be74",
        license="Apache-2.0 (MedSAM repository); the Zenodo deposit is listed as CC-BY-4.0",
        citation=_MEDSAM_CITATION,
        homepage="https://github.com/bowang-lab/MedSAM",
        notes="SAM ViT-B fine-tuned on 1.57M medical image-mask pairs (CT, MRI, ultrasound, ...). "
        "Box prompts. The best choice for CT/MRI on a GPU; on a 2-core CPU about 5 s per slice in this "
        "plugin, like SAM ViT-B (docs/performance.md).",
    ),
    ModelSpec(
        name="mobile_sam",
        display_name="MobileSAM",
        architecture="tiny_vit",
        input_size=1024,
        pipeline="sam",
        urls=(
            # The commit-pinned copy first: its bytes are the ones the checksum was taken from.
            "https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/"
            "f706ad9c4eb7f219c00d9050e46328518ffb65d2/weights/mobile_sam.pt",
            "https://raw.githubusercontent.com/ChaoningZhang/MobileSAM/master/weights/mobile_sam.pt",
        ),
        filename="mobile_sam.pt",
        size_bytes=40_728_226,
        sha256="6dbb90523a35330fedd7f1d3dfc66f995213d81b29a5ca8108dbcdd4e37d6c2f",
        license="Apache-2.0",
        citation="Zhang C. et al. Faster Segment Anything: Towards Lightweight SAM for Mobile "
        "Applications. arXiv:2306.14289 (2023)",
        homepage="https://github.com/ChaoningZhang/MobileSAM",
        notes="SAM's decoder with a 5M-parameter TinyViT encoder distilled from SAM ViT-H. "
        "Points and boxes, natural-image training. About 0.7 s per slice on a 2-core CPU in this plugin "
        "(docs/performance.md).",
    ),
    ModelSpec(
        name="lite_medsam",
        display_name="LiteMedSAM",
        architecture="lite_tiny_vit",
        input_size=256,
        pipeline="lite_medsam",
        urls=(
            _GDRIVE.format("18Zed-TUTsmr2zc5CHUWd5Tu13nb6vq6z"),
            "https://drive.google.com/uc?export=download&id=18Zed-TUTsmr2zc5CHUWd5Tu13nb6vq6z",
        ),
        filename="lite_medsam.pth",
        size_bytes=None,
        sha256="79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76",
        license="Apache-2.0",
        citation=_MEDSAM_CITATION + "; LiteMedSAM: Ma J. et al. Efficient MedSAMs: Segment "
        "Anything in Medical Images on Laptop. arXiv:2412.16085 (2024)",
        homepage="https://github.com/bowang-lab/MedSAM/tree/LiteMedSAM",
        notes="MedSAM distilled into a TinyViT encoder at 256x256 (about 8x faster than MedSAM in this "
        "plugin). Box prompts. The recommended model for CT/MRI on a CPU: about 0.6 s per slice on a "
        "2-core CPU (docs/performance.md).",
    ),
    # SAM 2.1 (release 2024-09-28). Sizes and SHA-256: Git LFS pointers (docs/models.md).
    _sam2_spec("tiny", "hiera_t", "Tiny", "38.9M", 156_008_466,
               "7402e0d864fa82708a20fbd15bc84245c2f26dff0eb43a4b5b93452deb34be69", "The smallest SAM 2.1; on a 2-core CPU this plugin encodes a slice in about 1.5 s "
               "(docs/performance.md)."),
    _sam2_spec("small", "hiera_s", "Small", "46M", 184_416_285,
               "6d1aa6f30de5c92224f8172114de081d104bbd23dd9dc5c58996f0cad5dc4d38",
               "On a 2-core CPU this plugin encodes a slice in about 1.8 s (docs/performance.md)."),
    _sam2_spec("base_plus", "hiera_b+", "Base+", "80.8M", 323_606_802,
               "a2345aede8715ab1d5d31b4a509fb160c5a4af1970f199d9054ccfb746c004c5",
               "On a 2-core CPU this plugin encodes a slice in about 3.4 s (docs/performance.md)."),
    _sam2_spec("large", "hiera_l", "Large", "224.4M", 898_083_611,
               "2647878d5dfa5098f2f8649825738a9345572bae2d4350a2468587ece47dd318",
               "The most accurate SAM 2.1; GPU recommended: on a 2-core CPU this plugin encodes a slice in "
               "about 7.6 s (docs/performance.md)."),
    ModelSpec(
        name="medsam2",
        display_name="MedSAM2",
        architecture="hiera_t512",
        input_size=512,
        pipeline="medsam2",
        urls=("https://huggingface.co/wanglab/MedSAM2/resolve/main/MedSAM2_latest.pt",),
        filename="MedSAM2_latest.pt",
        size_bytes=None,
        sha256=None,
        license="Apache-2.0",
        citation="Ma J. et al. MedSAM2: Segment Anything in 3D Medical Images and Videos. "
        "arXiv:2504.03600 (2025)",
        homepage="https://github.com/bowang-lab/MedSAM2",
        notes="SAM 2.1 Tiny fine-tuned on 455,000 3D medical image-mask pairs and 76,000 video frames "
        "(CT, MRI, PET, ultrasound, endoscopy), at 512x512; the release its authors recommend "
        "(MedSAM2_latest.pt). Box prompts; CT is windowed as MedSAM2's own inference script does. "
        "Tracks objects through the volume with its memory (the memory engine). On a 2-core CPU this plugin "
        "encodes a slice in about 0.29 s; tracking adds about a fifth of a second per slice (docs/performance.md).",
    ),
)

MODELS: dict[str, ModelSpec] = {spec.name: spec for spec in _SPECS}
if len(MODELS) != len(_SPECS):  # pragma: no cover - guards edits to the table above
    raise RuntimeError("duplicate model names in the registry")


def _local_models() -> dict[str, ModelSpec]:
    """The user's registered fine-tuned models (models/local.py), read from their folder now."""
    from .local import local_specs

    return {spec.name: spec for spec in local_specs(MODELS)}


def list_models() -> list[ModelSpec]:
    """All registered models, in the order the UI lists them: built-in ones, then the user's own."""
    return list(MODELS.values()) + list(_local_models().values())


def get_model(name: str | ModelSpec) -> ModelSpec:
    """The spec registered under ``name`` (a spec passes through unchanged)."""
    if isinstance(name, ModelSpec):
        return name
    if isinstance(name, str) and name in MODELS:
        return MODELS[name]
    local = _local_models() if isinstance(name, str) else {}
    if name in local:
        return local[name]
    raise MedSamError(f"unknown model {name!r}; choose one of: {', '.join([*MODELS, *local])}")


def recommended_model(has_gpu: bool, medical: bool = True) -> ModelSpec:
    """The default model for this machine: small TinyViT models on a CPU, ViT models on a GPU."""
    if has_gpu:
        return MODELS["medsam" if medical else "sam_vit_h"]
    return MODELS["lite_medsam" if medical else "mobile_sam"]


# --- concept (text-prompt) models: the EfficientSAM3 family, issue 18 ----------------------------
#
# A separate table: these models take a phrase (and optional exemplar boxes) and return every
# matching instance; they cannot answer a point or box prompt the way the point/box chooser expects,
# so ``MODELS`` / ``list_models()`` never list them. Sizes and SHA-256 of the checkpoints are not
# published (None: the hash of the downloaded file is recorded, not checked). The CLIP vocabulary
# that their tokenizer needs is one file with a known size and hash, fetched like weights.

__all__ += ["CLIP_VOCABULARY", "CONCEPT_MODELS", "DEFAULT_CONCEPT_MODEL", "ConceptModelSpec", "FileSpec",
            "get_concept_model", "list_concept_models"]


@dataclass(frozen=True)
class FileSpec:
    """A downloadable file that is not a model of the point/box table (a vocabulary, a concept model).

    It carries the fields the download machinery reads (``models/weights.py``): name, display name, URLs
    tried in order, file name in the cache, size and SHA-256 where known, and a homepage for the
    "download it yourself" hint.
    """

    name: str
    display_name: str
    urls: tuple[str, ...]
    filename: str
    size_bytes: int | None
    sha256: str | None
    license: str
    homepage: str
    notes: str = ""

    def __post_init__(self) -> None:
        _check_download_fields(self)


@dataclass(frozen=True)
class ConceptModelSpec(FileSpec):
    """An EfficientSAM3 image model (family ``"es3"``): student image encoder + MobileCLIP text encoder +
    SAM 3's detector. ``vision`` / ``text`` name the students (informative: the network reads every size
    from the checkpoint). ``threshold`` is the detection score threshold its authors use."""

    vision: str = ""
    text: str = ""
    citation: str = ""
    threshold: float = 0.5
    family: str = "es3"


_SAM3_RAW = "https://raw.githubusercontent.com/{}/{}/sam3/assets/bpe_simple_vocab_16e6.txt.gz"
CLIP_VOCABULARY = FileSpec(
    name="clip_bpe_vocab",
    display_name="CLIP BPE vocabulary",
    # SAM 3 at a pinned commit, EfficientSAM3 at a pinned commit (the same git blob 7b5088a5), SAM 3's main.
    urls=(
        _SAM3_RAW.format("facebookresearch/sam3", "99d02f28c8d34610ab35559b72642b01f10fdb1e"),
        _SAM3_RAW.format("SimonZeng7108/efficientsam3", "c1f0b022141a3acb0f70113c113ab172cf27b328"),
        _SAM3_RAW.format("facebookresearch/sam3", "main"),
    ),
    filename="bpe_simple_vocab_16e6.txt.gz",
    size_bytes=1_356_917,
    sha256="924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a",
    license="MIT (OpenAI CLIP's byte-pair merges, as shipped in SAM 3's assets)",
    homepage="https://github.com/facebookresearch/sam3",
    notes="The merges file of CLIP's byte-level BPE tokenizer; every EfficientSAM3 model needs it to read a phrase.",
)

_ES3_HF = "https://huggingface.co/Simon7108528/EfficientSAM3/resolve/main/efficientsam3_ft/{}"
_ES3_CITATION = ("Zeng S. et al. EfficientSAM3: Progressive Hierarchical Distillation for Video Concept "
                 "Segmentation from SAM1, 2, and 3. arXiv:2511.15833 (2025)")
_CONCEPT_SPECS: tuple[ConceptModelSpec, ...] = (
    ConceptModelSpec(
        name="efficientsam3_efficientvit",
        display_name="EfficientSAM3 EV-M",
        urls=(_ES3_HF.format("efficientsam3_efficientvit.pt"),),
        filename="efficientsam3_efficientvit.pt",
        size_bytes=None,
        sha256=None,
        license="Apache-2.0 (EfficientSAM3 repository); derived from SAM 3 (SAM License)",
        homepage="https://github.com/SimonZeng7108/efficientsam3",
        vision="EfficientViT-B1",
        text="MobileCLIP-S0 (16 tokens)",
        citation=_ES3_CITATION,
        notes="SAM 3's concept detector with an EfficientViT-B1 image student and a MobileCLIP-S0 text student "
        "(89M parameters), fine-tuned on 5 % of SA-1B with SACap labels. Natural-image training: medical "
        "phrases may work poorly; exemplar boxes help. A medical fine-tune with the same layout loads as a "
        "local checkpoint.",
    ),
)
CONCEPT_MODELS: dict[str, ConceptModelSpec] = {spec.name: spec for spec in _CONCEPT_SPECS}
DEFAULT_CONCEPT_MODEL = "efficientsam3_efficientvit"


def list_concept_models() -> list[ConceptModelSpec]:
    """The concept (text-prompt) models, in the order a UI lists them."""
    return list(CONCEPT_MODELS.values())


def get_concept_model(name: str | ConceptModelSpec) -> ConceptModelSpec:
    """The concept model registered under ``name``; a point/box model's name gets an error saying so."""
    if isinstance(name, ConceptModelSpec):
        return name
    if name in CONCEPT_MODELS:
        return CONCEPT_MODELS[name]
    if name in MODELS:
        raise MedSamError(f"{name} is a point/box model; text prompts need a concept model: "
                          f"{', '.join(CONCEPT_MODELS)} (or a local EfficientSAM3 checkpoint)")
    raise MedSamError(f"unknown concept model {name!r}; choose one of: {', '.join(CONCEPT_MODELS)}")
