"""Evaluation windows from plain text (``sglang_xshare.hf.text``): split rule, tokenizer, shuffling."""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("tokenizers")

from sglang_xshare.hf import make_batches  # noqa: E402
from sglang_xshare.hf.text import (is_heldout, iter_documents, load_text_eval_set, load_windows,  # noqa: E402
                                   save_windows, shuffled_windows, tokenize_documents)

ROOT = Path(__file__).resolve().parents[1]
WORDS = "the quick brown fox jumps over a lazy dog while experts route tokens in batches".split()


def _doc(seed: int, n_words: int = 900) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, size=n_words)) + "\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i in range(40):
        sub = root / "a" / f"d{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i}.txt").write_text(_doc(i))
    (root / "a" / "d0" / "zipped.rst.gz").write_bytes(gzip.compress(_doc(99).encode()))
    (root / "a" / "translations").mkdir()
    (root / "a" / "translations" / "skip.txt").write_text(_doc(7))
    (root / "a" / "image.svg").write_text("<svg/>")
    return root


def test_split_rule_is_the_training_runs():
    spec = importlib.util.spec_from_file_location("prepare_data", ROOT / "bench" / "quality" / "prepare_data.py")
    prepare_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare_data)

    for name in ("library/os.txt", "gcide/000017", "admin-guide/README.rst.gz", "x"):
        h = int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "little")
        assert is_heldout(name, 0.05) == ((h % 10_000) < 500) == prepare_data._is_heldout(name, 0.05)
    names = [f"doc{i}" for i in range(4000)]
    assert 0.03 < sum(is_heldout(n) for n in names) / len(names) < 0.07


def test_iter_documents(corpus):
    docs = dict(iter_documents(corpus / "a"))
    assert "d0/zipped.rst.gz" in docs and docs["d0/zipped.rst.gz"] == _doc(99)
    assert not any("translations" in n or n.endswith(".svg") for n in docs)
    assert len(docs) == 41


def test_tokenize_appends_eos():
    ids = tokenize_documents(["hello world", "second document"])
    from tokenizers import Tokenizer

    from sglang_xshare.hf import default_model_dir

    tok = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    assert int((ids == eos).sum()) == 2 and ids[-1] == eos
    assert tok.decode(ids[: list(ids).index(eos)].tolist()) == "hello world"


def test_shuffled_windows_keep_neighbours_apart():
    rng = np.random.default_rng(0)
    order = shuffled_windows(3000, 64, rng)
    assert len(order) >= 0.95 * 3000 and len(set(order.tolist())) == len(order)
    pos = {int(w): i for i, w in enumerate(order)}
    assert min(abs(pos[w + 1] - pos[w]) for w in pos if w + 1 in pos) >= 64
    assert not np.array_equal(order[:100], np.sort(order[:100]))  # shuffled
    with pytest.raises(ValueError, match="too few windows"):
        shuffled_windows(40, 64, np.random.default_rng(0))


def test_load_text_eval_set_and_batches(corpus):
    ev = load_text_eval_set([f"mine={corpus / 'a'}", str(corpus / "a" / "d1")], seq_len=16, split="all",
                            max_tokens=None, min_gap=8)
    assert ev.datasets == ("mine", "d1")
    n = ev.tokens.shape[1]
    assert ev.tokens.shape == (2, n, 17) and n > 50
    # each window is a stretch of the dataset's token stream
    stream = tokenize_documents([t.strip() for _, t in iter_documents(corpus / "a" / "d1")])
    w = int(ev.window_index[1, 0])
    assert torch.equal(ev.tokens[1, 0], torch.from_numpy(stream[w * 17 : (w + 1) * 17]))
    # a batch never holds two neighbouring windows of one dataset's stream
    for B in (2, 8, 16):
        for tok, ds in make_batches(ev, B, 3, "mixed", seq_len=16):
            for d in (0, 1):
                rows = [i for i in range(B) if int(ds[i]) == d]
                wins = {int(ev.window_index[d, (ev.tokens[d] == tok[i]).all(-1).nonzero()[0, 0]]) for i in rows}
                assert not any(x + 1 in wins for x in wins)
    with pytest.raises(ValueError, match="min_gap"):
        make_batches(ev, 9, 1, "homogeneous", seq_len=16)  # 9 windows of one dataset > min_gap 8
    # the split partitions the documents
    names = [n for n, _ in iter_documents(corpus / "a")]
    held = [n for n in names if is_heldout(n)]
    if held:
        ho = load_text_eval_set([str(corpus / "a")], seq_len=16, split="heldout", max_tokens=None, min_gap=2)
        assert ho.tokens.shape[1] < n
    else:
        with pytest.raises(ValueError, match="no heldout documents"):
            load_text_eval_set([str(corpus / "a")], seq_len=16, split="heldout", max_tokens=None, min_gap=2)


def test_windows_round_trip(corpus, tmp_path):
    ev = load_text_eval_set([str(corpus / "a")], seq_len=16, split="all", max_tokens=None, min_gap=4, max_windows=30)
    back, info = load_windows(save_windows(ev, tmp_path / "w.npz", {"split": "all"}))
    assert torch.equal(back.tokens, ev.tokens) and torch.equal(back.window_index, ev.window_index)
    assert back.datasets == ev.datasets and back.min_gap == 4 and info == {"split": "all"}
