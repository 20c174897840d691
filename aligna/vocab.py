"""Tokenizers (character, word, sentencepiece BPE / unigram) and the vocabulary.

A tokenizer turns a line of text into a list of string tokens and back (`encode` /
`decode`); the vocabulary maps tokens to ids. Both are saved as plain files beside the
model (JSON, a token list, sentencepiece's own model file), so translating raw text needs
nothing else and loading never unpickles anything.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

import sentencepiece as spm

from .config import TokenizerConfig

PAD, UNK, SOS, EOS = "<pad>", "<unk>", "<sos>", "<eos>"
SPECIALS = (PAD, UNK, SOS, EOS)
PAD_ID, UNK_ID, SOS_ID, EOS_ID = range(4)
# the pipeline's files in a model directory, one set per side (src, tgt)
TOKENIZER_FILE, SPM_FILE, VOCAB_FILE = "{side}_tokenizer.json", "{side}.spm.model", "{side}_vocab.txt"
PIPELINE_FILES = tuple(name.format(side=side) for side in ("src", "tgt") for name in (TOKENIZER_FILE, SPM_FILE, VOCAB_FILE))
SPACE = "\u2581"  # "▁", stands for a space in character and subword tokens


class Tokenizer(Protocol):
    def encode(self, text: str) -> list[str]: ...

    def decode(self, tokens: Sequence[str]) -> str: ...

    def save(self, directory: Path, prefix: str) -> None: ...


class WordTokenizer:
    """Whitespace tokens; `decode` joins them with single spaces."""

    def __init__(self, lowercase: bool = False) -> None:
        self.lowercase = lowercase

    def encode(self, text: str) -> list[str]:
        return (text.lower() if self.lowercase else text).split()

    def decode(self, tokens: Sequence[str]) -> str:
        return " ".join(tokens)

    def save(self, directory: Path, prefix: str) -> None:
        _write_json(directory / TOKENIZER_FILE.format(side=prefix), {"type": "word", "lowercase": self.lowercase})


class CharTokenizer:
    """One token per character; runs of whitespace become one `▁` token."""

    def __init__(self, lowercase: bool = False) -> None:
        self.lowercase = lowercase

    def encode(self, text: str) -> list[str]:
        text = " ".join((text.lower() if self.lowercase else text).split())
        return [SPACE if c == " " else c for c in text]

    def decode(self, tokens: Sequence[str]) -> str:
        return "".join(tokens).replace(SPACE, " ").strip()

    def save(self, directory: Path, prefix: str) -> None:
        _write_json(directory / TOKENIZER_FILE.format(side=prefix), {"type": "char", "lowercase": self.lowercase})


class SentencePieceTokenizer:
    """Subword units from sentencepiece (BPE: Sennrich et al. 2016; unigram: Kudo 2018)."""

    def __init__(self, model_proto: bytes, kind: str, lowercase: bool = False) -> None:
        self.model_proto = model_proto
        self.kind = kind
        self.lowercase = lowercase
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)

    @classmethod
    def train(cls, lines: Iterable[str], config: TokenizerConfig) -> SentencePieceTokenizer:
        lines = [line.lower() if config.lowercase else line for line in lines]
        buffer = io.BytesIO()
        spm.set_random_generator_seed(1)  # the same data gives the same model
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines),
                model_writer=buffer,
                model_type=config.type,
                vocab_size=config.vocab_size,
                character_coverage=config.character_coverage,
                # ids are assigned by aligna's Vocabulary; sentencepiece only segments.
                unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                input_sentence_size=2_000_000, shuffle_input_sentence=True,
                # every line is learned from: sentencepiece would skip lines over 4192 bytes unsaid
                max_sentence_length=max([4192, *(len(line.encode("utf-8")) for line in lines)]),
                num_threads=2, minloglevel=2,
            )  # fmt: skip
        except RuntimeError as e:
            raise ValueError(
                f"sentencepiece could not train a {config.type} model of vocab_size="
                f"{config.vocab_size}: {e} (a smaller tokenizer vocab_size may help)"
            ) from None
        return cls(buffer.getvalue(), config.type, config.lowercase)

    def encode(self, text: str) -> list[str]:
        return self.sp.encode(text.lower() if self.lowercase else text, out_type=str)

    def decode(self, tokens: Sequence[str]) -> str:
        return self.sp.decode_pieces(list(tokens))

    def save(self, directory: Path, prefix: str) -> None:
        model = SPM_FILE.format(side=prefix)
        (directory / model).write_bytes(self.model_proto)
        info = {"type": self.kind, "lowercase": self.lowercase, "model": model}
        _write_json(directory / TOKENIZER_FILE.format(side=prefix), info)


def build_tokenizer(config: TokenizerConfig, training_lines: Iterable[str]) -> Tokenizer:
    """A tokenizer for `config`; subword models are trained on `training_lines`."""
    if config.type == "word":
        return WordTokenizer(config.lowercase)
    if config.type == "char":
        return CharTokenizer(config.lowercase)
    return SentencePieceTokenizer.train(training_lines, config)


def load_tokenizer(directory: Path, prefix: str) -> Tokenizer:
    path = directory / TOKENIZER_FILE.format(side=prefix)
    try:
        info = json.loads(path.read_bytes().decode("utf-8"))
        kind, lowercase = info["type"], info["lowercase"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a tokenizer description ({e!s:.100})") from None
    if kind == "word":
        return WordTokenizer(lowercase)
    if kind == "char":
        return CharTokenizer(lowercase)
    if kind not in ("bpe", "unigram") or not isinstance(info.get("model"), str):
        raise ValueError(f"{path}: unknown tokenizer type {str(kind)[:40]!r}")
    model = directory / Path(info["model"]).name  # a file beside it, never a path elsewhere
    try:
        return SentencePieceTokenizer(model.read_bytes(), kind, lowercase)
    except RuntimeError as e:
        raise ValueError(f"{model}: not a sentencepiece model ({e!s:.100})") from None


class Vocabulary:
    """Token <-> id map. Ids 0-3 are `<pad>`, `<unk>`, `<sos>`, `<eos>`; text never maps to
    them: a token spelled like one in the user's data (the word "<eos>") is an ordinary token
    of its own id, so it neither ends a sentence nor hides as padding, and decodes as written.
    `stoi` is the text lookup (ordinary tokens only)."""

    def __init__(self, tokens: Sequence[str]) -> None:
        if tuple(tokens[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}")
        self.itos = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos) if i >= len(SPECIALS)}
        if len(self.stoi) != len(self.itos) - len(SPECIALS):
            raise ValueError("a vocabulary must not repeat a token")
        if any("\n" in t for t in self.itos):
            raise ValueError("a vocabulary token must not contain a line break (the file holds one a line)")

    @classmethod
    def build(cls, counts: Counter[str], min_freq: int = 1, max_size: int = 0) -> Vocabulary:
        """Most frequent first, ties broken alphabetically so the result is deterministic."""
        ranked = sorted((t for t, c in counts.items() if c >= min_freq), key=lambda t: (-counts[t], t))
        return cls(list(SPECIALS) + (ranked[:max_size] if max_size else ranked))

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        return [self.stoi.get(t, UNK_ID) for t in tokens]

    def itos_of(self, ids: Iterable[int]) -> list[str]:
        """The token of every id up to the first `<eos>`, specials included."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            out.append(self.itos[i])
        return out

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Tokens up to the first `<eos>`, with `<pad>` and `<sos>` left out."""
        out = []
        for i in ids:
            if i == EOS_ID:
                break
            if i not in (PAD_ID, SOS_ID):
                out.append(self.itos[i])
        return out

    def save(self, path: Path) -> None:
        path.write_text("".join(t + "\n" for t in self.itos), encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> Vocabulary:
        try:
            lines = path.read_bytes().decode("utf-8").split("\n")
            return cls(lines[:-1] if lines[-1] == "" else lines)  # the last line may lack its newline
        except (UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"{path}: not a vocabulary ({e!s:.100})") from None


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
