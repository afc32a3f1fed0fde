"""examples/char_lm.py: the corpus loader is deterministic and its splits are disjoint; the example's own loop
prunes a tiny model with a PruningSchedule, masks exact, and its export loads back equal.

The measurement (bits/char at 4x, 10x, 20x beside torch.nn.utils.prune) is benchmarks/bench_lm.py's, not a test's.
"""

from __future__ import annotations

import doctest
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import prunet
from prunet.schedule import PruningSchedule

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "char_lm.py"


@pytest.fixture(scope="module")
def lm():
    spec = importlib.util.spec_from_file_location("char_lm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_its_docstring_examples_run(lm):
    result = doctest.testmod(lm)
    assert result.attempted >= 3 and result.failed == 0


def test_the_vocabulary_is_fixed_and_round_trips(lm):
    assert lm.VOCAB_SIZE == 97
    text = "def f(x):\n    return x  # ok\n"
    assert lm.decode(lm.encode(text)) == text
    assert lm.encode("\t\u00e9").tolist() == [lm.UNKNOWN, lm.UNKNOWN]


def test_the_corpus_is_deterministic(lm):
    a, b = lm.stdlib_corpus(30_000), lm.stdlib_corpus(30_000)
    assert a.text == b.text and a.files == b.files and a.sha256 == b.sha256
    assert a.chars == 30_000
    assert a.files == [p.name for p in lm.stdlib_files()[: len(a.files)]]  # whole files in name order, the last cut
    described = a.describe()
    assert described["chars"] == 30_000 and described["n_files"] == len(a.files)


def test_a_folder_of_files_is_read_in_name_order(lm, tmp_path):
    for name, text in (("b.py", "bbbb\n"), ("a.py", "aaa\n"), ("c.txt", "not python")):
        (tmp_path / name).write_text(text)
    corpus = lm.stdlib_corpus(6, root=tmp_path)
    assert corpus.files == ["a.py", "b.py"] and corpus.text == "aaa\nbb"
    with pytest.raises(FileNotFoundError):
        lm.stdlib_corpus(10, root=tmp_path / "none")


def test_splits_are_by_position_and_disjoint(lm):
    n = 10_001
    tr, va, te = lm.split_by_position(n)
    ranges = sorted([*tr, *va, *te], key=lambda r: r.start)
    assert ranges[0].start == 0 and ranges[-1].stop == n
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))  # they tile 0..n: no overlap, no gap
    assert len(tr) == len(va) == len(te) == 10
    assert sum(r.stop - r.start for r in va) == sum(r.stop - r.start for r in te) == 500
    for t, v, s in zip(tr, va, te):  # within each piece: train, then validation, then test
        assert t.stop == v.start and v.stop == s.start
    data = lm.char_data(20_000, block=16)
    ids = lm.encode(data.corpus.text)
    for split, ranges in zip((data.train, data.val, data.test), lm.split_by_position(len(ids))):
        assert torch.equal(split.ids, torch.cat([ids[r] for r in ranges]))
    for split in (data.train, data.val, data.test):
        x, y = split[len(split) - 1]  # the last window's targets stay inside its split
        assert torch.equal(x[1:], y[:-1])
        xb, yb = split.batch(torch.tensor([0, len(split) - 1]))
        assert torch.equal(xb[1], x) and torch.equal(yb[1], y)
    with pytest.raises(IndexError):
        data.val[len(data.val)]


def test_the_own_loop_prunes_with_a_schedule_masks_exact(lm, tmp_path):
    torch.manual_seed(0)
    data = lm.char_data(6_000, block=8)
    model = lm.char_gpt(block=8, d_model=16, layers=1, heads=2, ffn=2)
    pruner = prunet.Pruner(model)
    layers = [r.layer for r in pruner.summary()]
    assert "blocks.layers.0.self_attn" in layers, layers  # the attention's in-projection is pruned by default
    assert "head" in layers and not any("embed" in name or "pos" in name for name in layers)
    steps = 6
    schedule = lm.ladder(pruner, [2.0, 4.0], steps_per_round=steps)
    cfg = lm.LoopConfig(epochs=1, batch_size=len(data.train) // steps + 1)
    for k in (1, 2):
        records = lm.train(model, data, cfg, schedule, log=lambda _: None)
        assert len(records) == 1 and records[0]["val_bpc"] > 0
    assert pruner.compression() == pytest.approx(4.0, rel=0.02)
    for t in pruner.targets:  # pruned weights are exactly zero after the steps; the masks are 0/1
        w, m = t.weight.detach(), t.mask
        assert torch.all(w[m == 0] == 0) and set(m.unique().tolist()) <= {0.0, 1.0}
    ckpt = prunet.save(model, tmp_path / "lm.safetensors")
    done = prunet.export(ckpt, tmp_path / "lm.prunet", model=lm.char_gpt(block=8, d_model=16, layers=1, heads=2, ffn=2))
    back = prunet.load(done.path, model=lm.char_gpt(block=8, d_model=16, layers=1, heads=2, ffn=2))
    x, _ = data.test.batch(torch.arange(3))
    with torch.no_grad():
        assert torch.equal(back(x), model.eval()(x))


def test_the_own_loop_never_returns_an_epoch_from_before_its_last_prune(lm, monkeypatch):
    """A gradual schedule that ends in the second of three epochs: however good the first epoch looked on
    validation (here it looks best), the model that comes back has the schedule's last masks."""
    torch.manual_seed(0)
    data = lm.char_data(6_000, block=8)
    model = lm.char_gpt(block=8, d_model=16, layers=1, heads=2, ffn=2)
    pruner = prunet.Pruner(model)
    cfg = lm.LoopConfig(epochs=3, batch_size=len(data.train) // 4 + 1)  # 4 steps an epoch
    schedule = PruningSchedule.gradual(pruner, target=8, start=0, end=6, every=2)
    scores = iter([1.0, 2.0, 3.0])  # validation bits/char by epoch: the first (least pruned) is the best
    monkeypatch.setattr(lm, "bits_per_char", lambda model, windows, batch_size=256: next(scores))
    lm.train(model, data, cfg, schedule, log=lambda _: None)
    assert pruner.compression() == pytest.approx(8, rel=0.02)
    for t in pruner.targets:
        assert torch.all(t.weight.detach()[t.mask == 0] == 0)


def test_the_example_run_prunes_to_its_target_and_loads_back_equal(lm, tmp_path, capsys):
    """``python examples/char_lm.py``, shrunk to one epoch each on a few thousand characters."""
    assert lm.main(["--chars", "8000", "--dense-epochs", "1", "--prune-epochs", "1", "--target", "10",
                    "--out", str(tmp_path / "own"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "loaded back equal: True" in out and (tmp_path / "own" / "pruned.prunet").is_file()
    reached = float(out.split("test: dense ")[1].split(", ")[1].split("x ")[0])
    assert reached == pytest.approx(10, rel=0.05)
