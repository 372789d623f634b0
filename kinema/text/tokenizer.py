"""The umT5 tokenizer, with the prompt cleaning of the Wan2.1 reference.

The reference tokenises with `transformers.AutoTokenizer('google/umt5-xxl')`
after cleaning the prompt (ftfy, HTML entities, whitespace runs) and appends
`</s>`. Kinema reads the same tokenizer files without transformers: a
`tokenizer.json` through the `tokenizers` library, or a SentencePiece
`spiece.model` through `sentencepiece`, and adds `</s>` itself so both
backends behave the same. Nothing is ever downloaded.
"""

from __future__ import annotations

import html
import os
import re
from pathlib import Path
from typing import Callable

import torch

from kinema.errors import KinemaError

# File names a tokenizer folder may hold, in order of preference. tokenizer.json
# wins because it is what the reference (a fast Hugging Face tokenizer) reads.
TOKENIZER_FILES = ("tokenizer.json", "spiece.model")
# The reference pads or truncates every prompt to this many tokens (</s> included).
MAX_LENGTH = 512

_WHITESPACE = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The reference's 'whitespace' cleaning: ftfy, HTML unescaped twice, whitespace runs to one space."""
    import ftfy

    text = ftfy.fix_text(text)
    # Twice, so doubly escaped entities such as '&amp;amp;' come out as '&'.
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def find_tokenizer_file(folder: Path) -> Path | None:
    """The tokenizer file in `folder`, or None when it holds none."""
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            return folder / name
    return None


class UMT5Tokenizer:
    """Prompts -> (ids [B, L], mask [B, L]); each row is the cleaned prompt's tokens plus </s>, right-padded."""

    def __init__(
        self,
        encode: Callable[[str], list[int]],
        eos_id: int,
        pad_id: int,
        vocab_size: int,
        source: str,
        max_length: int = MAX_LENGTH,
    ):
        self._encode = encode
        self.eos_id = eos_id
        self.pad_id = pad_id
        self.vocab_size = vocab_size
        self.source = source
        self.max_length = max_length

    @classmethod
    def from_path(cls, path: str | os.PathLike, max_length: int = MAX_LENGTH) -> "UMT5Tokenizer":
        """Load from a folder holding tokenizer.json or spiece.model, or from such a file."""
        p = Path(path).expanduser()
        if p.is_dir():
            found = find_tokenizer_file(p)
            if found is None:
                raise KinemaError(
                    f"no tokenizer in folder {p}: expected one of {', '.join(TOKENIZER_FILES)} "
                    "(e.g. the google/umt5-xxl/ folder of the Wan2.1 release, or a diffusers tokenizer/ folder)."
                )
            p = found
        elif not p.is_file():
            raise KinemaError(
                f"tokenizer not found: {p}. Pass a folder holding {' or '.join(TOKENIZER_FILES)}, or the file."
            )
        if p.suffix == ".json":
            return cls._from_tokenizer_json(p, max_length)
        if p.suffix == ".model":
            return cls.from_sentencepiece(p.read_bytes(), str(p), max_length)
        raise KinemaError(f"{p} is not a tokenizer file; expected a tokenizer.json or a SentencePiece .model file.")

    @classmethod
    def _from_tokenizer_json(cls, path: Path, max_length: int) -> "UMT5Tokenizer":
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception subclass
            raise KinemaError(f"{path} is not a readable tokenizer.json ({exc}).") from None
        # Truncation, padding and </s> are applied here, whatever the file configures.
        tok.no_truncation()
        tok.no_padding()
        eos = tok.token_to_id("</s>")
        if eos is None:
            raise KinemaError(f"{path} has no '</s>' token; it is not a T5 tokenizer.")
        pad = tok.token_to_id("<pad>")
        return cls(
            lambda text: tok.encode(text, add_special_tokens=False).ids,
            eos,
            0 if pad is None else pad,
            tok.get_vocab_size(with_added_tokens=True),
            str(path),
            max_length,
        )

    @classmethod
    def from_sentencepiece(cls, model_proto: bytes, source: str, max_length: int = MAX_LENGTH) -> "UMT5Tokenizer":
        """From the bytes of a SentencePiece model (a spiece.model file, or one embedded in a checkpoint)."""
        import sentencepiece

        sp = sentencepiece.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(model_proto)
        except Exception as exc:  # sentencepiece raises RuntimeError/OSError depending on version
            raise KinemaError(f"{source} is not a readable SentencePiece model ({exc}).") from None
        eos = sp.eos_id() if sp.eos_id() >= 0 else sp.piece_to_id("</s>")
        if eos == sp.unk_id():
            raise KinemaError(f"{source} has no '</s>' token; it is not a T5 tokenizer.")
        pad = sp.pad_id()
        return cls(
            lambda text: sp.encode(text, out_type=int),
            eos,
            0 if pad < 0 else pad,
            sp.get_piece_size(),
            source,
            max_length,
        )

    def token_ids(self, text: str) -> list[int]:
        """Ids of one prompt: cleaned, tokenised, cut to max_length - 1, then </s>."""
        ids = self._encode(clean_text(text))[: self.max_length - 1]
        return ids + [self.eos_id]

    def __call__(self, texts: str | list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch of prompts -> ids and mask [B, L], padded to the longest prompt rather than max_length:
        the encoder output on the real tokens is the same, and far cheaper."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise KinemaError("no prompts to tokenise: pass a non-empty list of strings.")
        rows = [self.token_ids(t) for t in texts]
        length = max(len(r) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id, dtype=torch.long)  # [B, L]
        mask = torch.zeros((len(rows), length), dtype=torch.long)  # [B, L]
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask

    def __repr__(self) -> str:
        return f"UMT5Tokenizer({self.source!r}, vocab_size={self.vocab_size}, max_length={self.max_length})"
