"""The corpus and the tokenizer.

Corpus: the English fortune-cookie collection of Debian's `fortunes` and `fortunes-min`
packages (quotations, poems, definitions, jokes, literature; about 2.5 MB of text in
/usr/share/games/fortunes), installed by the project's setup (.ci/run, README), never
downloaded at run time. Each file holds records separated by lines holding only "%".

Split: the records of all files are shuffled with a fixed seed and cut into train and
validation by bytes (5 % validation), so both sets draw from every file.

Tokenizer: bytes (vocabulary 256; no download, no merges). Perplexity is per byte.
"""

import os
import random
from pathlib import Path
from typing import List, Tuple

import torch

DEFAULT_CORPUS = "/usr/share/games/fortunes"
VOCAB = 256
_SKIP_SUFFIXES = (".dat", ".u8")  # strfile indexes; .u8 are links to the same text


def corpus_files(root: str) -> List[Path]:
    """The text files of a fortunes directory (or the one file given), in name order."""
    p = Path(root)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(
            f"train_lm: no corpus at {root}: install Debian's fortunes packages "
            "(apt-get install fortunes fortunes-min) or pass --corpus DIR (a copy of /usr/share/games/fortunes)")
    files = sorted(f for f in p.iterdir()
                   if f.is_file() and not f.is_symlink() and not f.name.endswith(_SKIP_SUFFIXES))
    if not files:
        raise FileNotFoundError(f"train_lm: {root} holds no fortune files")
    return files


def records(files: List[Path]) -> List[bytes]:
    out = []
    for f in files:
        text = f.read_bytes().replace(b"\r\n", b"\n")
        for rec in text.split(b"\n%\n"):
            rec = rec.strip(b"%\n")
            if rec:
                out.append(rec + b"\n\n")
    return out


def load_split(root: str = DEFAULT_CORPUS, val_share: float = 0.05, seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) as uint8 byte tensors."""
    recs = records(corpus_files(root))
    random.Random(seed).shuffle(recs)
    total = sum(len(r) for r in recs)
    val, n = [], 0
    while recs and n < val_share * total:
        r = recs.pop()
        val.append(r)
        n += len(r)
    as_tensor = lambda rs: torch.frombuffer(bytearray(b"".join(rs)), dtype=torch.uint8).clone()
    return as_tensor(recs), as_tensor(val)


def corpus_root(arg: str = "") -> str:
    return arg or os.environ.get("OMNIMOE_CORPUS", DEFAULT_CORPUS)


class Batches:
    """Random training windows of seq + 1 bytes (inputs and next-byte targets) from a fixed
    generator, so every FFN sees the same batches in the same order."""

    def __init__(self, data: torch.Tensor, seq: int, batch: int, seed: int = 1):
        if data.numel() <= seq + 1:
            raise ValueError(f"train_lm: corpus of {data.numel()} bytes is shorter than a window of {seq + 1}")
        self.data, self.seq, self.batch = data, seq, batch
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, device) -> Tuple[torch.Tensor, torch.Tensor]:
        # Starts in [0, n - seq - 1): the very last window (n - seq - 1) is never drawn, one of
        # 2.4 million; left so that the committed runs reproduce with this code.
        starts = torch.randint(0, self.data.numel() - self.seq - 1, (self.batch,), generator=self.gen)
        win = torch.stack([self.data[s:s + self.seq + 1] for s in starts.tolist()]).long()
        return win[:, :-1].to(device, non_blocking=True), win[:, 1:].to(device, non_blocking=True)


def validation_windows(data: torch.Tensor, seq: int, max_windows: int) -> torch.Tensor:
    """Consecutive non-overlapping windows of seq + 1 bytes over the validation set (at most
    max_windows of them), [n, seq + 1] int64: every FFN is scored on the same bytes."""
    n = min((data.numel() - 1) // seq, max_windows)
    idx = torch.arange(n)[:, None] * seq + torch.arange(seq + 1)[None, :]
    return data[idx].long()
