"""EfficientSAM3 text side: the CLIP BPE tokenizer and the MobileCLIP-S0 text student.

Golden tests compare with the official EfficientSAM3 code's outputs for the reduced random-weight model
(``efficientsam3/`` in the golden folder; see its README, flow step 4(a)1). The tokenizer tests derive
their expected ids from the vocabulary file and CLIP's rules (an id is the rank of the merge that forms
the symbol plus 512), not from the tokenizer under test.
"""

from __future__ import annotations

import gzip
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_medsam.models.networks.es3 import (
    END_OF_TEXT,
    MOBILECLIP_S0,
    START_OF_TEXT,
    ClipTokenizer,
    MobileClipTextConfig,
    TextStudentEncoder,
    build_text_encoder,
    infer_text_config,
    text_state_dict,
)
from napari_medsam.models.networks.es3.tokenizer import pretokenize

pytestmark = pytest.mark.usefixtures("two_torch_threads")

LIVER, VISUAL = 12639, 7195  # README: "liver" -> [49406, 12639, 49407, 0...], "visual" -> [..., 7195, ...]


@pytest.fixture(scope="module")
def tokenizer(es3_dir: Path) -> ClipTokenizer:
    return ClipTokenizer(es3_dir / "bpe_simple_vocab_16e6.txt.gz", context_length=16)


@pytest.fixture(scope="module")
def merge_rank(es3_dir: Path) -> dict[str, int]:
    """Symbol -> vocabulary id for every merge result, read straight from the file (id = 512 + rank)."""
    with gzip.open(es3_dir / "bpe_simple_vocab_16e6.txt.gz", "rt", encoding="utf-8") as fh:
        lines = fh.read().split("\n")[1:48895]
    ids: dict[str, int] = {}
    for rank, line in enumerate(lines):
        ids.setdefault("".join(line.split()), 512 + rank)
    return ids


def _row(*ids: int, length: int = 16) -> list[int]:
    return [START_OF_TEXT, *ids, END_OF_TEXT] + [0] * (length - len(ids) - 2)


# --- tokenizer -------------------------------------------------------------------------------------


def test_vocabulary_layout(tokenizer, merge_rank):
    assert tokenizer.vocab_size == 49408
    assert merge_rank["liver</w>"] == LIVER and merge_rank["visual</w>"] == VISUAL
    assert tokenizer.encoder["<start_of_text>"] == 49406 and tokenizer.encoder["<end_of_text>"] == 49407
    # the first 256 ids are the printable byte characters first ('!' = 0), then the remapped ones
    assert tokenizer.encoder["!"] == 0 and tokenizer.encoder[","] == ord(",") - ord("!")
    assert tokenizer.encoder[",</w>"] == 256 + ord(",") - ord("!")


def test_lower_case_and_whitespace(tokenizer):
    expected = _row(LIVER)
    for text in ("liver", "LIVER", "Liver", "  liver \t\n", "\u00a0liver\u2003"):
        assert tokenizer(text).tolist() == [expected], text
    assert tokenizer("left   KIDNEY").tolist() == tokenizer("left kidney").tolist()


def test_punctuation_and_contractions(tokenizer, merge_rank):
    comma = 256 + ord(",") - ord("!")  # "," alone is a byte character with the end-of-word marker
    assert tokenizer("liver,").tolist() == [_row(LIVER, comma)]
    assert tokenizer("liver , visual").tolist() == [_row(LIVER, comma, VISUAL)]
    # "it's" splits into the letter run "it" and the contraction "'s", each a whole-word symbol
    assert tokenizer.encode("It's") == [merge_rank["it</w>"], merge_rank["'s</w>"]]
    # HTML entities are unescaped (twice) before splitting: "&amp;amp;" -> "&"
    assert tokenizer.encode("liver &amp;amp; visual") == tokenizer.encode("liver & visual")


def test_pretokenize_rules():
    assert pretokenize("it's a man's 2024 x²!?") == ["it", "'s", "a", "man", "'s", "2", "0", "2", "4", "x", "²", "!?"]
    assert pretokenize("!'s") == ["!'", "s"]  # a run of "other" characters is taken first, greedily
    assert pretokenize("<end_of_text>ab") == ["<end_of_text>", "ab"]
    assert pretokenize("naïve\u00a0日本") == ["naïve", "日本"]


def test_pretokenize_matches_clip_pattern():
    regex = pytest.importorskip("regex")  # not a dependency; used here only as the reference when present
    pattern = regex.compile(
        r"<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+", regex.IGNORECASE)
    rng = random.Random(7)
    pool = [*"abcXyz '!?.,-_&;:\t0123456789", "'s", "'ll", "é", "ß", "²", "½", "Ⅻ", "日", "🫁", "\u00a0", "\u0301",
            "٣", "<end_of_text>", "ﬁ", "Ａ"]
    for _ in range(500):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 20))).lower()
        assert pretokenize(text) == pattern.findall(text), repr(text)


def test_truncation_keeps_end_token(tokenizer):
    ids = tokenizer("liver " * 30)[0].tolist()
    assert ids == [START_OF_TEXT] + [LIVER] * 14 + [END_OF_TEXT]
    ids = tokenizer("liver " * 14)[0].tolist()  # exactly fits: nothing replaced
    assert ids == [START_OF_TEXT] + [LIVER] * 14 + [END_OF_TEXT]
    assert tokenizer("liver visual", context_length=3)[0].tolist() == [START_OF_TEXT, LIVER, END_OF_TEXT]
    assert tokenizer(["liver"], context_length=77).shape == (1, 77)


def test_empty_and_batch(tokenizer):
    assert tokenizer("").tolist() == [_row()]
    assert tokenizer("   ").tolist() == [_row()]
    assert tokenizer(["liver", "visual", ""]).tolist() == [_row(LIVER), _row(VISUAL), _row()]


def test_multibyte_characters(tokenizer, merge_rank):
    # "é" is UTF-8 C3 A9, i.e. the byte characters "Ã" "©"; the vocabulary has their merge with "</w>"
    assert tokenizer.encode("é") == [merge_rank["Ã©</w>"]]
    for text in ("café", "naïve", "日本語の肝臓", "lungs 🫁"):
        ids = tokenizer.encode(text)
        assert all(0 <= i < START_OF_TEXT for i in ids)
        symbols = "".join(tokenizer.decoder[i] for i in ids)
        mapped = "</w>".join("".join(tokenizer._byte_char[b] for b in word.encode()) for word in text.split())
        assert symbols == mapped + "</w>"  # BPE only regroups the word's byte characters
        assert tokenizer.decode(ids) == text + " "


# --- text encoder -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint(es3_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(es3_dir / "es3_reduced_random.pt", map_location="cpu", weights_only=True)["model"]


@pytest.fixture(scope="module")
def golden(es3_dir: Path):
    return np.load(es3_dir / "es3_golden_image.npz")


@pytest.fixture(scope="module")
def reduced(checkpoint, tokenizer) -> TextStudentEncoder:
    state = text_state_dict(checkpoint)
    config, d_model = infer_text_config(state, n_heads=2)
    assert config == MobileClipTextConfig(dim=16, n_heads=2, n_transformer_layers=2, context_length=16)
    assert d_model == 64
    return build_text_encoder(config, d_model, state, tokenizer)


def _close(actual: torch.Tensor, expected: np.ndarray) -> None:
    assert tuple(actual.shape) == expected.shape
    scale = float(np.abs(expected).max())
    assert scale > 0
    err = float(np.abs(actual.detach().numpy().astype(np.float64) - expected).max())
    assert err <= 1e-4 * scale, f"max |diff| {err:.3g} > 1e-4 * {scale:.3g}"


def test_strict_load_is_exactly_the_language_backbone(checkpoint, reduced):
    prefix = "detector.backbone.language_backbone."
    assert {prefix + k for k in reduced.state_dict()} == {k for k in checkpoint if k.startswith(prefix)}
    fresh = TextStudentEncoder(reduced.encoder.config, 64)
    assert not fresh.load_state_dict(text_state_dict(checkpoint), strict=True).missing_keys


@pytest.mark.parametrize("word", ["liver", "visual"])
def test_golden_text_features(reduced, golden, word):
    with torch.no_grad():
        out = reduced([word])
    assert out.tokens.tolist() == golden[f"text_{word}_tokens"].tolist()
    _close(out.features, golden[f"text_{word}_features"])
    if word == "liver":
        _close(out.embeds, golden["text_liver_embeds"])
        assert out.mask.tolist() == golden["text_liver_mask"].tolist()
    assert set(out.as_dict()) == {"language_features", "language_mask", "language_embeds"}


def test_golden_batch_matches_single(reduced, golden):
    with torch.no_grad():
        out = reduced(["visual", "liver"])
    assert out.features.shape == (16, 2, 64) and out.mask.shape == (2, 16)
    _close(out.features[:, 1:2], golden["text_liver_features"])
    _close(out.features[:, 0:1], golden["text_visual_features"])


def test_full_size_keys_and_shapes(es3_dir):
    prefix = "backbone.language_backbone."
    expected = {}
    for line in (es3_dir / "keys_es3_full_b0_mclipS0.tsv").read_text().splitlines():
        if line.startswith(prefix):
            key, shape, dtype = line.split("\t")
            expected[key[len(prefix):]] = ([int(s) for s in shape.strip("[]").split(",") if s.strip()], dtype)
    with torch.device("meta"):
        model = TextStudentEncoder(MOBILECLIP_S0, d_model=256)
    built = {k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}
    assert built == expected
    meta_state = {k: torch.empty(shape, device="meta") for k, (shape, _) in expected.items()}
    assert infer_text_config(meta_state, n_heads=8) == (MOBILECLIP_S0, 256)


def test_context_length_truncation():
    torch.manual_seed(0)
    model = build_text_encoder(MobileClipTextConfig(dim=16, n_heads=2, n_transformer_layers=1, context_length=77),
                               d_model=8)
    table = model.encoder.positional_embedding.pos_embed.pos_embed.detach().clone()
    model.encoder.set_context_length(16)
    assert model.context_length == 16
    assert torch.equal(model.encoder.positional_embedding.pos_embed.pos_embed, table[:, :, :16])
    tokens = torch.tensor([[START_OF_TEXT, LIVER, END_OF_TEXT] + [0] * 13])
    with torch.no_grad():
        out = model.forward_tokens(tokens)
    assert out.features.shape == (16, 1, 8) and out.mask[0].tolist() == [False] * 3 + [True] * 13
    with pytest.raises(RuntimeError, match="tokenizer"):
        model("liver")
