"""Evaluation windows from any plain text: documents -> evaluation model's tokenizer -> shuffled windows.

``load_text_eval_set(["pydoc=/usr/share/doc/python3.11/html/_sources", ...])`` reads every
source (one dataset each), tokenises it with the byte-level BPE tokenizer of the evaluation model
(``bench/data/model/tokenizer.json``; ``<|endoftext|>`` after every document), cuts the
dataset's token stream into non-overlapping windows of ``seq_len + 1`` tokens and shuffles them so
that two neighbouring windows of the stream (one document's consecutive text) are at least
``min_gap`` places apart: a batch of up to ``min_gap`` windows per dataset never holds both.

Train / held-out split: the rule of ``bench/quality/prepare_data.py``, which trained the evaluation
model -- a document is held out when ``sha1(name) % 10000 < frac * 10000`` (``frac`` = 0.05),
the name being its path relative to the source folder (GCIDE: ``gcide/NNNNNN``, 200 entries per
document). Documents of the ``train`` split are text the model was trained on (up to the
per-dataset token cap of training), ``heldout`` documents it never saw.

Sources: a folder (its ``.txt`` / ``.rst`` / ``.md`` files, gzip'ed or not, recursively, except
paths containing ``translations/``), a text file (one document, gzip'ed or not), or a dictd
``*.dict.dz`` file (entries grouped into documents as prepare_data does). ``NAME=PATH`` names the
dataset (default: the path's last component).
"""

from __future__ import annotations

import gzip
import hashlib
import re
import zlib
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np
import torch

from .model import EvalSet, default_model_dir

__all__ = ["is_heldout", "iter_documents", "tokenize_documents", "shuffled_windows", "load_text_eval_set", "Split",
           "save_windows", "load_windows"]

Split = Literal["heldout", "train", "all"]
EOS = "<|endoftext|>"
_TEXT = re.compile(r"\.(txt|rst|md)(\.gz)?$")


def is_heldout(doc_name: str, frac: float = 0.05) -> bool:
    """The evaluation model's document-level split: ``True`` for about ``frac`` of all names."""
    h = int.from_bytes(hashlib.sha1(doc_name.encode()).digest()[:8], "little")
    return (h % 10_000) < int(frac * 10_000)


def _read(p: Path) -> str:
    raw = p.read_bytes()
    if p.suffix == ".gz" or p.suffix == ".dz":
        raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(raw) if p.suffix == ".dz" else gzip.decompress(raw)
    return raw.decode("utf-8", errors="replace")


def iter_documents(path: str | Path, dict_entries: int = 200,
                   exclude: tuple[str, ...] = ("translations/",)) -> Iterator[tuple[str, str]]:
    """``(name, text)`` of every document of one source (see the module docstring), sorted by name."""
    p = Path(path)
    if p.is_dir():
        for f in sorted(p.rglob("*")):
            rel = str(f.relative_to(p))
            if f.is_file() and _TEXT.search(rel) and not any(x in rel for x in exclude):
                yield rel, _read(f)
    elif p.is_file() and p.name.endswith(".dict.dz"):
        stem = p.name[: -len(".dict.dz")]
        blocks = [b for b in _read(p).split("\n\n") if b.strip() and not b.lstrip().startswith("00-database")]
        for i in range(0, len(blocks), dict_entries):
            yield f"{stem}/{i // dict_entries:06d}", "\n\n".join(blocks[i : i + dict_entries])
    elif p.is_file():
        yield p.name, _read(p)
    else:
        raise FileNotFoundError(f"no text at {p}")


def tokenize_documents(docs: Iterable[str], tokenizer_path: str | Path | None = None) -> np.ndarray:
    """One ``[n] int64`` stream: every document's tokens followed by ``<|endoftext|>``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path or default_model_dir() / "tokenizer.json"))
    eos = tok.token_to_id(EOS)
    ids: list[int] = []
    for enc in tok.encode_batch(list(docs)):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def shuffled_windows(n_windows: int, min_gap: int, rng: np.random.Generator, lookahead: int = 4096) -> np.ndarray:
    """A random order of (almost all of) ``range(n_windows)`` in which windows ``w`` and ``w + 1``
    are ``>= min_gap`` apart.

    Greedy: walk a random permutation, taking the first not-yet-placed window (within
    ``lookahead``) whose stream neighbours were not placed in the last ``min_gap - 1`` slots; a
    window that fits nowhere at the end of the walk is left out (at most 5 %, else ``ValueError``).
    """
    queue = deque(rng.permutation(n_windows).tolist())
    placed_at: dict[int, int] = {}
    out: list[int] = []
    while queue:
        for j in range(min(lookahead, len(queue))):
            w = queue[j]
            if all(len(out) - placed_at.get(nb, -min_gap) >= min_gap for nb in (w - 1, w + 1)):
                del queue[j]
                placed_at[w] = len(out)
                out.append(w)
                break
        else:  # the tail of the walk can hold only neighbours of recent windows: leave one out
            queue.popleft()
    if len(out) < 0.95 * n_windows:
        raise ValueError(f"cannot keep neighbouring windows {min_gap} apart: too few windows ({n_windows})")
    return np.asarray(out, dtype=np.int64)


def load_text_eval_set(sources: list[str], seq_len: int = 64, split: Split = "heldout", heldout_frac: float = 0.05,
                       max_windows: int | None = None, max_tokens: int | None = 2_000_000, seed: int = 0,
                       min_gap: int = 64, tokenizer_path: str | Path | None = None) -> EvalSet:
    """Windows of ``seq_len + 1`` tokens from ``sources`` (``NAME=PATH`` or ``PATH``), one dataset each.

    Args:
        split: ``heldout`` / ``train`` documents by :func:`is_heldout`, or ``all``.
        max_windows: windows kept per dataset (default: the smallest dataset's count).
        max_tokens: documents (in a seeded random order) are tokenised until a dataset has this
            many tokens (bounds the time on large training corpora); ``None`` = all.
        min_gap: see :func:`shuffled_windows`.

    Returns:
        :class:`EvalSet` with ``tokens [n_datasets, n, seq_len + 1]`` (shuffled) and ``window_index``
        (each window's position in its dataset's stream).
    """
    if split not in ("heldout", "train", "all"):
        raise ValueError(f"split must be heldout, train or all, got {split!r}")
    rng = np.random.default_rng(seed)
    names, rows, index = [], [], []
    for src in sources:
        name, sep, path = src.partition("=")
        if not sep:
            name, path = Path(src).name.split(".")[0] or src, src
        docs = [(n, t.strip()) for n, t in iter_documents(path)]
        docs = [(n, t) for n, t in docs if len(t) >= 64
                and (split == "all" or is_heldout(n, heldout_frac) == (split == "heldout"))]
        if not docs:
            raise ValueError(f"{src}: no {split} documents")
        if max_tokens is not None:  # a seeded random subset of documents, tokenised in chunks
            order = rng.permutation(len(docs))
            chunks, total = [], 0
            for i in range(0, len(order), 64):
                part = tokenize_documents([docs[j][1] for j in order[i : i + 64]], tokenizer_path)
                chunks.append(part)
                total += part.size
                if total >= max_tokens:
                    break
            stream = np.concatenate(chunks)[:max_tokens]
        else:
            stream = tokenize_documents([t for _, t in docs], tokenizer_path)
        w = seq_len + 1
        n = stream.size // w
        wins = stream[: n * w].reshape(n, w)
        order = shuffled_windows(n, min_gap, rng)
        names.append(name)
        rows.append(wins[order])
        index.append(order)
    keep = min(r.shape[0] for r in rows) if max_windows is None else max_windows
    if any(r.shape[0] < keep for r in rows):
        raise ValueError(f"a dataset has fewer than {keep} windows: {[r.shape[0] for r in rows]}")
    tokens = torch.from_numpy(np.stack([r[:keep] for r in rows]))
    return EvalSet(tokens, tuple(names), torch.from_numpy(np.stack([i[:keep] for i in index])), min_gap)


def save_windows(ev: EvalSet, path: str | Path, info: dict | None = None) -> Path:
    """Write an eval set's windows to one ``.npz`` (``uint16`` tokens), e.g. to carry tokenised text to a
    machine without the corpora; :func:`load_windows` reads it back."""
    import json

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(p, tokens=ev.tokens.numpy().astype(np.uint16),
                        window_index=(ev.window_index if ev.window_index is not None else torch.zeros(0)).numpy(),
                        meta=np.frombuffer(json.dumps({"datasets": list(ev.datasets), "min_gap": ev.min_gap,
                                                       "info": info or {}}).encode(), dtype=np.uint8))
    return p


def load_windows(path: str | Path) -> tuple[EvalSet, dict]:
    """``(EvalSet, info)`` from :func:`save_windows`."""
    import json

    z = np.load(Path(path))
    meta = json.loads(bytes(z["meta"]).decode())
    wi = torch.from_numpy(z["window_index"].astype(np.int64)) if z["window_index"].size else None
    return EvalSet(torch.from_numpy(z["tokens"].astype(np.int64)), tuple(meta["datasets"]), wi, meta["min_gap"]), meta["info"]
