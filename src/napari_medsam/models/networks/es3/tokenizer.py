"""The CLIP byte-level BPE tokenizer, as used by SAM 3 and EfficientSAM3 for text prompts.

CLIP (Radford et al., 2021) tokenises lower-cased text with byte-pair encoding over UTF-8 bytes: every
byte is first mapped to a printable unicode character, a word is split into those characters with an
end-of-word marker ``</w>`` on the last one, and the ranked merges of the vocabulary file
(``bpe_simple_vocab_16e6.txt.gz``) are applied, lowest rank first, until none applies. The vocabulary
is then: the 256 byte characters, the same with ``</w>``, one entry per merge (48,894), and the two
special tokens ``<start_of_text>`` (49406) and ``<end_of_text>`` (49407): 49,408 ids in all.

A prompt becomes ``[49406, ids..., 49407]`` padded with zeros to the context length; a longer one is
cut at the context length and its last id replaced by 49407, so the end token is always present.

Text cleaning follows CLIP's "lower" mode: (``ftfy.fix_text`` when ftfy is installed; it is optional
here and not a dependency), HTML entities unescaped twice, runs of whitespace collapsed to one space,
ends stripped, lower-cased. Without ftfy, typographic damage that ftfy would repair (mojibake, curly
quotes, ligatures, full-width forms) is left as typed, which can change the ids of such text.

Pre-tokenisation splits the cleaned text, left to right, into: a special token written literally,
the contractions ``'s 't 're 've 'm 'll 'd``, a run of letters (Unicode category L*), a single
number character (category N*), or a run of characters that are neither whitespace, letter nor
number. CLIP writes this as a pattern of the third-party ``regex`` package (``\\p{L}``, ``\\p{N}``),
which Python's ``re`` cannot express (``re`` has no Unicode property classes, and ``[^\\W\\d_]``
would also take characters such as "²" or "½" into a run of letters). It is therefore written here
as a small scanner over :func:`unicodedata.category`, which gives the same splits; the only
differences left are characters that Python's Unicode tables (the interpreter's version) classify
differently from the ``regex`` package's newer tables: characters assigned in recent Unicode versions.
Whitespace is what ``regex``'s ``\\s`` matches: ``str.isspace`` minus the four separators U+001C..U+001F.
"""

from __future__ import annotations

import gzip
import html
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

__all__ = ["CLIP_VOCAB_SIZE", "END_OF_TEXT", "START_OF_TEXT", "ClipTokenizer"]

START_OF_TEXT = 49406
END_OF_TEXT = 49407
CLIP_VOCAB_SIZE = 49408
_N_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2  # 48,894 merge lines follow the file's header line
_SPECIALS = ("<start_of_text>", "<end_of_text>")
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# Whitespace as the `regex` package's \s: str.isspace() without the information separators 1C..1F.
_WHITESPACE_RUN = re.compile(r"[^\S\x1c-\x1f]+")


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """CLIP's reversible map from the 256 byte values to printable unicode characters.

    Bytes that are printable Latin-1 characters map to themselves; the 68 others (controls, space,
    DEL, NBSP, soft hyphen) map to U+0100 onwards, in byte order. The dict's order (printable bytes
    first, then the others) is the order of the first 256 vocabulary ids.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _is_space(ch: str) -> bool:
    return ch.isspace() and not "\x1c" <= ch <= "\x1f"


def _kind(ch: str) -> str:
    """'L' letter, 'N' number, ' ' whitespace, 'O' anything else."""
    if _is_space(ch):
        return " "
    major = unicodedata.category(ch)[0]
    return major if major in "LN" else "O"


def pretokenize(text: str) -> list[str]:
    """Split cleaned text into the pieces that are BPE-encoded one by one (see the module docstring)."""
    pieces: list[str] = []
    i, n = 0, len(text)
    while i < n:
        special = next((s for s in _SPECIALS if text.startswith(s, i)), None)
        if special is None:
            special = next((c for c in _CONTRACTIONS if text.startswith(c, i)), None)
        if special is not None:
            pieces.append(special)
            i += len(special)
            continue
        kind = _kind(text[i])
        if kind == " ":
            i += 1
            continue
        j = i + 1
        if kind != "N":  # numbers go one character at a time; letters and "other" as runs
            while j < n and _kind(text[j]) == kind:
                j += 1
        pieces.append(text[i:j])
        i = j
    return pieces


def clean_text(text: str) -> str:
    """CLIP's "lower" cleaning: (ftfy if installed), unescape HTML twice, collapse whitespace, lower-case."""
    try:  # optional, as in CLIP; never a dependency of this project
        import ftfy  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE_RUN.sub(" ", text).strip().lower()


class ClipTokenizer:
    """Text to CLIP BPE ids, from the merges file ``bpe_simple_vocab_16e6.txt.gz`` (path given)."""

    def __init__(self, bpe_path: str | Path, context_length: int = 77) -> None:
        with gzip.open(bpe_path, "rt", encoding="utf-8") as fh:
            lines = fh.read().split("\n")
        merges = [tuple(line.split()) for line in lines[1:_N_MERGES + 1]]
        if len(merges) != _N_MERGES or any(len(m) != 2 for m in merges):
            raise ValueError(f"{bpe_path}: not a CLIP BPE merges file ({len(merges)} merge lines)")
        byte_chars = list(byte_to_char().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + list(_SPECIALS)
        self.encoder: dict[str, int] = {token: i for i, token in enumerate(vocab)}
        self.decoder: dict[int, str] = {i: token for token, i in self.encoder.items()}
        self.ranks: dict[tuple[str, str], int] = {m: r for r, m in enumerate(merges)}
        self.context_length = int(context_length)
        self._byte_char = byte_to_char()
        self._char_byte = {c: b for b, c in self._byte_char.items()}
        self._cache: dict[str, list[str]] = {s: [s] for s in _SPECIALS}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, piece: str) -> list[str]:
        """The BPE symbols of one pre-tokenised piece (already mapped to byte characters)."""
        cached = self._cache.get(piece)
        if cached is not None:
            return cached
        word = [*piece[:-1], piece[-1] + "</w>"]
        while len(word) > 1:
            # the adjacent pair with the lowest merge rank; merge all its (left-to-right) occurrences
            best = min(zip(word, word[1:]), key=lambda pair: self.ranks.get(pair, _N_MERGES))
            if best not in self.ranks:
                break
            first, second = best
            merged: list[str] = []
            k = 0
            while k < len(word):
                if k + 1 < len(word) and word[k] == first and word[k + 1] == second:
                    merged.append(first + second)
                    k += 2
                else:
                    merged.append(word[k])
                    k += 1
            word = merged
        self._cache[piece] = word
        return word

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens or padding."""
        ids: list[int] = []
        for piece in pretokenize(clean_text(text)):
            if piece not in _SPECIALS:
                piece = "".join(self._byte_char[b] for b in piece.encode("utf-8"))
            ids.extend(self.encoder[symbol] for symbol in self._bpe(piece))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of BPE ids: end-of-word markers become spaces, special tokens stay as their names."""
        chars = "".join(self.decoder[int(i)] for i in ids)
        raw = bytearray(self._char_byte[c] for c in chars)
        return raw.decode("utf-8", errors="replace").replace("</w>", " ")

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None):
        """[N, context_length] int64 tensor of ids: start, text, end, zero padding; long text is cut
        at the context length with its last id replaced by the end token."""
        import torch

        if isinstance(texts, str):
            texts = [texts]
        length = int(context_length or self.context_length)
        if length < 2:
            raise ValueError(f"context length {length}: needs room for the start and end tokens")
        out = torch.zeros(len(texts), length, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [START_OF_TEXT, *self.encode(text), END_OF_TEXT]
            if len(ids) > length:
                ids = ids[:length - 1] + [END_OF_TEXT]
            out[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out
