"""A vocabulary shortlist: the output layer computed over the few target tokens a batch can use.

Most of a small-batch beam step on a CPU goes to the output layer and what reads its V
columns (log-softmax, top-k). A sentence is translated into a small part of the target
vocabulary, though: the most frequent target tokens ("a", "the", ".") and the likely
translations of its source tokens. A shortlist lists both (Marian's lexical shortlists,
CTranslate2's vocabulary map); a batch is then decoded over the union of its sentences'
candidates, which `search.search` maps back to target ids.

It is built from the training corpus by co-occurrence (`build`): a source token's
candidates are the target tokens that appear most often in the sentence pairs it appears
in, relative to its own count, p(t | s) = count(s, t) / count(s), after the always-included
frequent tokens. It is written in CTranslate2's vocabulary map format (`write`, one line per
source token, `source<TAB>target target ...`; the line with an empty source lists the tokens
that are always candidates), so `aligna export` hands the same list to CTranslate2.

A shortlist changes what the search may emit: a token outside it is never chosen, and the
softmax is normalized over the candidates. Measure BLEU with and without it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import DataError
from .runtime import Int8Linear
from .tensorfiles import atomic_write_text
from .vocab import SPECIALS, Vocabulary

FILE = "shortlist.txt"  # in a model directory
VMAP = "vmap.txt"  # the same file in a CTranslate2 export, where CTranslate2 looks for it


@dataclass
class Shortlist:
    """Target candidates by source token, as ids of the model's vocabularies."""

    always: Tensor  # (A,) target ids that are always candidates, the special tokens among them
    table: Tensor  # (V_src, N) each source id's candidate target ids, -1 where it has fewer than N
    tgt_size: int  # the target vocabulary's size

    def candidates(self, src: Tensor) -> Tensor:
        """src (B, S) padded source ids -> (V',) the batch's candidate target ids, ascending:
        the special tokens first, so that each one's position is its id."""
        chosen = torch.zeros(self.tgt_size + 1, dtype=torch.bool)  # the last slot takes the -1 fill
        chosen[self.always] = True
        chosen[self.table[src.unique().cpu()].flatten()] = True
        chosen[-1] = False
        return chosen[:-1].nonzero().squeeze(1).to(src.device)

    def write(self, path: Path, src_names: Sequence[str], tgt_names: Sequence[str]) -> None:
        """CTranslate2's vocabulary map, token strings (`names[id]`: a vocabulary's itos, or
        an export's `export.ct2_tokens`): `src<TAB>tgt tgt ...`; an empty source first, for
        the tokens that are always candidates."""
        lines = ["\t" + " ".join(tgt_names[t] for t in self.always.tolist())]  # specials by name (CTranslate2's)
        for src_id, row in enumerate(self.table.tolist()):
            row = [t for t in row if t >= 0]
            if row and src_id >= len(SPECIALS):
                lines.append(f"{src_names[src_id]}\t{' '.join(tgt_names[t] for t in row)}")
        atomic_write_text(path, "\n".join(lines) + "\n")

    @classmethod
    def read(cls, path: Path, src_vocab: Vocabulary, tgt_vocab: Vocabulary) -> Shortlist:
        """A shortlist written by `write`; a token the vocabularies lack is an error naming its line."""
        always: list[int] = list(range(len(SPECIALS)))
        rules: dict[int, list[int]] = {}
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None
        # Lines and tokens split as CTranslate2 splits them, at "\n" and " " only: a subword such
        # as U+0085 (which str.splitlines and str.split take for a break) is a token.
        lines = text.split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for number, line in enumerate(lines, start=1):
            source, tab, targets = line.removesuffix("\r").partition("\t")
            if not tab:
                raise DataError(f"{path}:{number}: expected source<TAB>targets")
            ids = []
            tokens = [t for t in targets.split(" ") if t]
            named = 0  # the always line names the specials first (kept anyway); text spelled alike after them is a token
            while not source and named < min(len(tokens), len(SPECIALS)) and tokens[named] == SPECIALS[named]:
                named += 1
            tokens = tokens[named:]
            for token in tokens:
                if token not in tgt_vocab.stoi:
                    raise DataError(f"{path}:{number}: target token {token[:40]!r} is not in the target vocabulary")
                ids.append(tgt_vocab.stoi[token])
            if not source:
                always += ids
            elif source in src_vocab.stoi:
                rules[src_vocab.stoi[source]] = ids
            else:
                raise DataError(f"{path}:{number}: source token {source[:40]!r} is not in the source vocabulary")
        width = max((len(r) for r in rules.values()), default=0)
        table = torch.full((len(src_vocab), max(width, 1)), -1, dtype=torch.long)
        for src_id, ids in rules.items():
            table[src_id, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return cls(torch.tensor(sorted(set(always))), table, len(tgt_vocab))


def build(
    pairs: Iterable[tuple[Sequence[int], Sequence[int]]], src_size: int, tgt_size: int, frequent: int = 100,
    per_source: int = 50, merge_every: int = 50_000,
) -> Shortlist:  # fmt: skip
    """From (source ids, target ids) sentence pairs: the `frequent` most frequent target tokens
    (and the special ones) always, and for each source token the `per_source` other target tokens
    with the highest p(t | s) = count(s, t) / count(s), counting each token once per pair. The
    pairs are counted `merge_every` sentences at a time, so memory grows with the distinct pairs
    seen, not with the corpus."""
    src_seen, tgt_seen = torch.zeros(src_size, dtype=torch.long), torch.zeros(tgt_size, dtype=torch.long)
    pair, count = torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)  # s * V_tgt + t, count(s, t)
    keys: list[Tensor] = []

    def merge() -> None:  # add the pairs of the last sentences to the counts
        nonlocal pair, count
        new, counts = torch.cat(keys).unique(return_counts=True)
        pair, inverse = torch.cat([pair, new]).unique(return_inverse=True)
        count = torch.zeros(pair.numel(), dtype=torch.long).index_add_(0, inverse, torch.cat([count, counts]))
        keys.clear()

    for number, (src, tgt) in enumerate(pairs, start=1):
        s, t = torch.tensor(sorted(set(src)), dtype=torch.long), torch.tensor(sorted(set(tgt)), dtype=torch.long)
        src_seen[s] += 1
        tgt_seen[t] += 1
        keys.append((s.unsqueeze(1) * tgt_size + t).flatten())
        if number % merge_every == 0:
            merge()
    if keys:
        merge()
    always = set(range(len(SPECIALS))) | set(tgt_seen.topk(min(frequent, tgt_size)).indices.tolist())
    table = torch.full((src_size, per_source), -1, dtype=torch.long)
    if pair.numel():
        s, t = pair // tgt_size, pair % tgt_size
        keep = ~torch.isin(t, torch.tensor(sorted(always)))
        s, t, p = s[keep], t[keep], count[keep].double() / src_seen[s[keep]]
        order = torch.argsort(-p, stable=True)  # by p(t | s), highest first,
        order = order[torch.argsort(s[order], stable=True)]  # then by source, keeping that order within each
        s, t = s[order], t[order]
        first = torch.searchsorted(s, s)  # where each source's run starts
        rank = torch.arange(s.numel()) - first
        kept = rank < per_source
        table[s[kept], rank[kept]] = t[kept]
    return Shortlist(torch.tensor(sorted(always)), table, tgt_size)


def restrict(layer: nn.Module, ids: Tensor) -> nn.Module:
    """The output layer `layer` (nn.Linear, or `Int8Linear` in an int8 copy) over the rows `ids`
    only: (*, d) -> (*, len(ids)), once per batch."""
    if isinstance(layer, Int8Linear):
        return layer.rows(ids)
    if isinstance(layer, nn.Linear):
        return _Rows(layer.weight.detach()[ids], None if layer.bias is None else layer.bias.detach()[ids])
    raise TypeError(f"a shortlist cannot restrict a {type(layer).__name__} output layer")


class _Rows(nn.Module):
    """Some rows of a linear layer: y = x W[ids]^T + b[ids], for decoding (no gradients)."""

    def __init__(self, weight: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def make(model_dir: str | Path, frequent: int = 100, per_source: int = 50) -> tuple[Path, Shortlist]:
    """Build the shortlist of a model directory from its config's training corpus, tokenized
    as the model was, and write it to MODEL_DIR/shortlist.txt."""
    from .config import load_config
    from .data import Pipeline, read_parallel
    from .modeldir import CONFIG, ModelDir

    md = ModelDir(model_dir)
    md.require()
    config = load_config(md / CONFIG)
    if config.model.arch != "transformer":  # before counting the whole corpus for nothing
        raise ValueError(f"{md.path}: a vocabulary shortlist restricts a Transformer's output layer; this model is "
                         f"an {config.model.arch.upper()}, which decodes over its whole vocabulary")  # fmt: skip
    pipeline = Pipeline.load(md.path)
    train = read_parallel(config.data.train, "train")
    pairs = ((pipeline.src_ids(s), pipeline.tgt_ids(t)) for s, t in zip(train.src, train.tgt))
    shortlist = build(pairs, len(pipeline.src_vocab), len(pipeline.tgt_vocab), frequent, per_source)
    shortlist.write(md / FILE, pipeline.src_vocab.itos, pipeline.tgt_vocab.itos)
    return md / FILE, shortlist
