"""Build the quality-model datasets from Debian documentation packages.

Three separate English-text datasets (so batches can be homogeneous or mixed):

* ``pydoc``  -- reStructuredText sources of the Python 3.11 docs (``python3.11-doc``)
* ``kernel`` -- Linux 6.1 kernel documentation, ``.rst``/``.txt`` (``linux-doc-6.1``), no translations
* ``gcide``  -- the GNU Collaborative International Dictionary of English (``dict-gcide``)

Install them first (Debian)::

    apt-get update && apt-get install -y python3.11-doc linux-doc-6.1 dict-gcide

Each dataset is split by *document* into train and held-out parts (a stable hash of the
document name, ``--heldout-frac`` of documents; GCIDE is cut into documents of
``--gcide-entries`` consecutive entries).  Held-out documents are never trained on.

A byte-level BPE tokenizer (``tokenizers``) is trained on the train split only, and every
split is tokenized into one flat ``uint16`` stream per dataset and split, documents joined
by the ``<|endoftext|>`` token.  Outputs (``--out``)::

    tokenizer.json
    {name}_train.npy   [n_tokens] uint16   (capped at --max-train-tokens per dataset)
    {name}_heldout.npy [n_tokens] uint16
    data_meta.json     sizes, sources, split rule

and, with ``--eval-out``, the small held-out evaluation set (bench/data/model)::

    eval_tokens.npy  [n_datasets, n_seq, seq_len + 1] uint16  (non-overlapping held-out windows)
    eval_meta.json   dataset names in row order, seq_len, provenance
    tokenizer.json, tokenizer_config.json   (so AutoTokenizer loads it from the model folder)

Usage (from the repository root)::

    .venv/bin/python bench/quality/prepare_data.py --out .dev/quality_data \\
        --eval-out bench/data/model
"""
from __future__ import annotations

import argparse
import gzip
import json
import re
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

from sglang_xshare.hf.text import is_heldout

EOS = "<|endoftext|>"
PYDOC_ROOT = Path("/usr/share/doc/python3.11/html/_sources")
KERNEL_ROOT = Path("/usr/share/doc/linux-doc-6.1/Documentation")
GCIDE_DICT = Path("/usr/share/dictd/gcide.dict.dz")
DATASETS = ("pydoc", "kernel", "gcide")


# Stable document-level split (sha1 of the name): one rule, shared with the quality harness.
_is_heldout = is_heldout


def iter_pydoc() -> Iterator[tuple[str, str]]:
    """Yield ``(name, text)`` for every reST source of the Python docs."""
    if not PYDOC_ROOT.is_dir():
        raise FileNotFoundError(f"{PYDOC_ROOT} missing: apt-get install python3.11-doc")
    for p in sorted(PYDOC_ROOT.rglob("*.txt")):
        yield str(p.relative_to(PYDOC_ROOT)), p.read_text(encoding="utf-8", errors="replace")


def iter_kernel() -> Iterator[tuple[str, str]]:
    """Yield ``(name, text)`` for the kernel's English .rst/.txt docs (gzip'ed by Debian)."""
    if not KERNEL_ROOT.is_dir():
        raise FileNotFoundError(f"{KERNEL_ROOT} missing: apt-get install linux-doc-6.1")
    for p in sorted(KERNEL_ROOT.rglob("*.gz")):
        rel = str(p.relative_to(KERNEL_ROOT))
        if rel.startswith("translations/") or not re.search(r"\.(rst|txt)\.gz$", rel):
            continue
        text = gzip.decompress(p.read_bytes()).decode("utf-8", errors="replace")
        yield rel, text


def iter_gcide(entries_per_doc: int) -> Iterator[tuple[str, str]]:
    """Yield ``(name, text)`` documents of ``entries_per_doc`` consecutive dictionary entries.

    ``gcide.dict.dz`` is dictzip (gzip-compatible).  Entries are separated by blank lines
    followed by a headword line; we cut on blank lines, which keeps entries whole.
    """
    if not GCIDE_DICT.is_file():
        raise FileNotFoundError(f"{GCIDE_DICT} missing: apt-get install dict-gcide")
    raw = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(GCIDE_DICT.read_bytes())
    blocks = [b for b in raw.decode("utf-8", errors="replace").split("\n\n") if b.strip()]
    # drop the dictd header entries (00-database-*)
    blocks = [b for b in blocks if not b.lstrip().startswith("00-database")]
    for i in range(0, len(blocks), entries_per_doc):
        yield f"gcide/{i // entries_per_doc:06d}", "\n\n".join(blocks[i : i + entries_per_doc])


def load_splits(frac: float, gcide_entries: int) -> dict[str, dict[str, list[str]]]:
    """Return ``{dataset: {"train": [doc...], "heldout": [doc...]}}``."""
    sources = {
        "pydoc": iter_pydoc(),
        "kernel": iter_kernel(),
        "gcide": iter_gcide(gcide_entries),
    }
    out: dict[str, dict[str, list[str]]] = {}
    for name, it in sources.items():
        split: dict[str, list[str]] = {"train": [], "heldout": []}
        for doc_name, text in it:
            text = text.strip()
            if len(text) < 64:
                continue
            split["heldout" if _is_heldout(doc_name, frac) else "train"].append(text)
        out[name] = split
    return out


def train_tokenizer(docs: list[str], vocab_size: int, path: Path) -> "object":
    """Train a byte-level BPE tokenizer on ``docs`` and save it as ``tokenizer.json``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    tok.save(str(path))
    return tok


def encode_stream(tok: "object", docs: list[str], eos_id: int) -> np.ndarray:
    """Encode ``docs`` into one ``[n_tokens] uint16`` stream, ``eos_id`` after every document."""
    ids: list[int] = []
    for enc in tok.encode_batch(docs):  # type: ignore[attr-defined]
        ids.extend(enc.ids)
        ids.append(eos_id)
    arr = np.asarray(ids, dtype=np.int64)
    if arr.max(initial=0) >= 2**16:
        raise ValueError("vocabulary does not fit uint16")
    return arr.astype(np.uint16)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for tokenizer + token streams")
    ap.add_argument("--eval-out", type=Path, default=None, help="folder for the evaluation set")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--heldout-frac", type=float, default=0.05)
    ap.add_argument("--gcide-entries", type=int, default=200)
    ap.add_argument("--max-train-tokens", type=int, default=7_000_000,
                    help="cap per dataset (keeps the carried data small)")
    ap.add_argument("--eval-seq-len", type=int, default=128)
    ap.add_argument("--eval-seqs", type=int, default=256, help="held-out windows per dataset in the evaluation set")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    splits = load_splits(args.heldout_frac, args.gcide_entries)
    rng = np.random.default_rng(args.seed)
    # tokenizer: trained on train docs only, with an equal character budget per dataset
    tok_docs: list[str] = []
    for name in DATASETS:
        docs = list(splits[name]["train"])
        rng.shuffle(docs)
        budget, used = 8_000_000, 0
        for d in docs:
            if used >= budget:
                break
            tok_docs.append(d)
            used += len(d)
    tok = train_tokenizer(tok_docs, args.vocab_size, args.out / "tokenizer.json")
    eos_id = tok.token_to_id(EOS)  # type: ignore[attr-defined]

    meta: dict[str, object] = {
        "datasets": list(DATASETS),
        "vocab_size": tok.get_vocab_size(),  # type: ignore[attr-defined]
        "eos_id": eos_id,
        "heldout_frac": args.heldout_frac,
        "split_rule": "sha1(document name) % 10000 < heldout_frac * 10000 -> held-out",
        "sources": {"pydoc": str(PYDOC_ROOT), "kernel": str(KERNEL_ROOT), "gcide": str(GCIDE_DICT)},
        "sizes": {},
    }
    eval_rows = []
    for name in DATASETS:
        docs_tr = list(splits[name]["train"])
        rng.shuffle(docs_tr)  # shuffled documents: the cap then keeps a random subset
        train = encode_stream(tok, docs_tr, eos_id)[: args.max_train_tokens]
        held = encode_stream(tok, splits[name]["heldout"], eos_id)
        np.save(args.out / f"{name}_train.npy", train)
        np.save(args.out / f"{name}_heldout.npy", held)
        chars = sum(len(d) for d in docs_tr)
        meta["sizes"][name] = {  # type: ignore[index]
            "train_docs": len(docs_tr), "heldout_docs": len(splits[name]["heldout"]),
            "train_tokens": int(train.size), "heldout_tokens": int(held.size),
            "train_chars_total": chars,
        }
        print(f"{name:7s} train docs {len(docs_tr):6d} tokens {train.size:9d} | "
              f"held-out docs {len(splits[name]['heldout']):5d} tokens {held.size:8d}")
        w = args.eval_seq_len + 1
        n_win = held.size // w
        if n_win < args.eval_seqs:
            raise ValueError(f"{name}: only {n_win} held-out windows, need {args.eval_seqs}")
        starts = np.sort(rng.choice(n_win, size=args.eval_seqs, replace=False)) * w
        eval_rows.append(np.stack([held[s : s + w] for s in starts]))
    (args.out / "data_meta.json").write_text(json.dumps(meta, indent=2))

    if args.eval_out is not None:
        args.eval_out.mkdir(parents=True, exist_ok=True)
        np.save(args.eval_out / "eval_tokens.npy", np.stack(eval_rows).astype(np.uint16))
        (args.eval_out / "eval_meta.json").write_text(json.dumps({
            "datasets": list(DATASETS),
            "shape": "[n_datasets, n_seq, seq_len + 1] uint16",
            "seq_len": args.eval_seq_len,
            "n_seq": args.eval_seqs,
            "source": "held-out documents of bench/quality/prepare_data.py (never trained on)",
            "seed": args.seed,
        }, indent=2))
        import shutil
        shutil.copy(args.out / "tokenizer.json", args.eval_out / "tokenizer.json")
        # lets transformers.AutoTokenizer (and SGLang) load the tokenizer from the model folder
        (args.eval_out / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "pad_token": EOS,
            "model_max_length": 512, "clean_up_tokenization_spaces": False,
        }, indent=2) + "\n")


if __name__ == "__main__":
    main()
