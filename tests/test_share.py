"""Weight sharing and Huffman coding (Deep Compression): clusters, centroid gradients, exact masks, the file."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import REAL_FASHION, TINY_RECIPE
from safetensors.torch import load_file

import prunet.phases
import prunet.pipeline

from prunet import Pruner, Sparsity
from prunet.checkpoint import save_checkpoint
from prunet.config import ConfigError, recipe_from_dict
from prunet.masks import baked_copy
from prunet.models import create_model
from prunet.pipeline import resume, run
from prunet.share import kmeans_1d, share, shared_layers, unshare
from prunet.sparse import CompactFileError, export, load
from prunet.sparse import huffman
from prunet.sparse.compact import shared_stats, stored_bytes


def test_kmeans_on_a_hand_made_tensor():
    values = torch.tensor([0.0, 0.1, 0.2, 5.0, 5.1, 10.0, 9.9])
    centroids, assign = kmeans_1d(values, 3)
    assert centroids.tolist() == pytest.approx([0.1, 5.05, 9.95])
    assert assign.tolist() == [0, 0, 0, 1, 1, 2, 2]


def test_kmeans_starts_linear_and_keeps_empty_clusters_in_place():
    values = torch.tensor([0.0, 0.0, 1.0])
    centroids, assign = kmeans_1d(values, 3)  # linear start 0, 0.5, 1: the middle one never gains a member
    assert centroids.tolist() == pytest.approx([0.0, 0.5, 1.0]) and assign.tolist() == [0, 0, 2]


def pruned_lenet(seed=0, sparsity=0.9):
    torch.manual_seed(seed)
    model = create_model("lenet_300_100")
    pruner = Pruner(model)
    pruner.prune(Sparsity(sparsity))
    return model, pruner


def test_centroid_gradients_are_the_sums_of_their_members_gradients():
    model, _ = pruned_lenet()
    plain = baked_copy(model)
    layers = share(model, bits=4)
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    F.cross_entropy(model(x), y).backward()
    twin = copy.deepcopy(plain)  # the same (shared) values as plain weights
    with torch.no_grad():
        for name, layer in layers.items():
            dict(twin.named_parameters())[name].copy_(
                torch.where(layer.keep, layer.codebook[layer.index], torch.zeros(())))
    F.cross_entropy(twin(x), y).backward()
    assert shared_layers(model).keys() == layers.keys()  # found again on the model, codebooks included
    for name, layer in layers.items():
        g = dict(twin.named_parameters())[name].grad
        expected = torch.zeros(layer.codebook.numel()).index_add_(0, layer.index[layer.keep], g[layer.keep])
        assert torch.allclose(layer.codebook.grad, expected, atol=1e-6), name


def test_training_a_shared_model_moves_only_centroids_and_keeps_pruned_weights_zero():
    model, pruner = pruned_lenet()
    masks = {k: v.clone() for k, v in pruner.masks.items()}
    share(model, bits=3)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    for name, mask in masks.items():
        w = dict((n, getattr(m, "weight")) for n, m in model.named_children() if hasattr(m, "weight"))[name[:-7]]
        assert not bool((w[mask == 0] != 0).any()), name
        assert torch.unique(w[mask != 0]).numel() <= 8, name  # still 2^3 shared values
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plain = unshare(model)
    assert torch.equal(plain.fc1.weight, before["fc1.parametrizations.weight.original"][before[
        "fc1.parametrizations.weight.0.index"]] * before["fc1.parametrizations.weight.0.keep"])


def test_huffman_round_trip_and_near_entropy():
    rng = np.random.default_rng(0)
    p = np.array([0.5, 0.2, 0.1, 0.08, 0.06, 0.03, 0.02, 0.01])
    symbols = rng.choice(8, size=20_000, p=p)
    counts = np.bincount(symbols, minlength=8)
    lengths = huffman.code_lengths(counts)
    data = huffman.encode(symbols, lengths)
    assert np.array_equal(huffman.decode(data, lengths, symbols.size), symbols)
    assert len(data) * 8 <= 1.02 * huffman.entropy_bits(counts) + 8
    assert sum(2.0 ** -int(n) for n in lengths if n) <= 1.0  # a prefix code
    one = np.zeros(10, dtype=np.int64)
    assert np.array_equal(huffman.decode(huffman.encode(one, huffman.code_lengths(np.bincount(one))),
                                         huffman.code_lengths(np.bincount(one)), 10), one)


def reference_decode(data: bytes, lengths: np.ndarray, count: int) -> list[int]:
    """Bit by bit through the canonical code: the obviously correct decoder."""
    codes = huffman.canonical_codes(lengths)
    table = {(int(n), int(c)): s for s, (n, c) in enumerate(zip(lengths, codes)) if n}
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8))
    out, code, n = [], 0, 0
    for b in bits:
        code, n = (code << 1) | int(b), n + 1
        if (n, code) in table:
            out.append(table[(n, code)])
            code, n = 0, 0
            if len(out) == count:
                break
    return out


@pytest.mark.parametrize("alphabet, size, skew", [(2, 1, 0.5), (3, 257, 0.9), (32, 5_000, 0.3), (600, 3_000, 0.01),
                                                  (4, 100_000, 0.6)])
def test_huffman_decode_matches_the_bit_by_bit_decoder(alphabet, size, skew):
    rng = np.random.default_rng(alphabet)
    symbols = np.minimum(rng.geometric(skew, size) - 1, alphabet - 1)
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=alphabet))
    data = huffman.encode(symbols, lengths)
    got = huffman.decode(data, lengths, size)
    assert got.tolist() == reference_decode(data, lengths, size) == symbols.tolist()


def test_a_truncated_or_garbled_huffman_stream_is_an_error():
    rng = np.random.default_rng(1)
    symbols = rng.choice(5, size=4_000, p=[0.6, 0.2, 0.1, 0.05, 0.05])
    lengths = huffman.code_lengths(np.bincount(symbols, minlength=5))
    data = huffman.encode(symbols, lengths)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        huffman.decode(data[: len(data) // 2], lengths, symbols.size)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        huffman.decode(data, lengths, symbols.size + 50)
    # A code set with a gap (lengths 1 and 2: the prefix 11 has no symbol) and a stream of ones.
    gappy = np.array([1, 2, 0])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        huffman.decode(b"\xff", gappy, 3)


def test_huffman_lengths_are_limited():
    counts = np.array([2 ** i for i in range(40)], dtype=np.int64)  # Fibonacci-like: depth 39 unlimited
    lengths = huffman.code_lengths(counts, max_length=12)
    assert lengths.max() <= 12 and sum(2.0 ** -int(n) for n in lengths) <= 1.0
    symbols = np.repeat(np.arange(40), 3)
    assert np.array_equal(huffman.decode(huffman.encode(symbols, lengths), lengths, symbols.size), symbols)


@pytest.fixture
def pruned_checkpoint(tmp_path):
    model, _ = pruned_lenet(sparsity=0.93)
    path = tmp_path / "final.safetensors"
    save_checkpoint(path, model, {"model": "lenet_300_100", "model_kwargs": {}})
    return path, model


def test_export_quantized_then_load_gives_the_shared_model(pruned_checkpoint, tmp_path):
    path, model = pruned_checkpoint
    done = export(path, tmp_path / "q.prunet", quantize={"fc": 4, "fc3": 6})
    plain = export(path, tmp_path / "p.prunet")
    assert done.bytes < plain.bytes / 2.5  # 4-6 bit Huffman-coded clusters instead of 32-bit values
    expected = baked_copy(model)
    share(expected, {"fc": 4, "fc3": 6})
    x = torch.randn(32, 1, 28, 28)
    loaded = load(tmp_path / "q.prunet").eval()
    assert torch.equal(loaded(x), expected.eval()(x))
    assert torch.unique(loaded.fc1.weight[loaded.fc1.weight != 0]).numel() <= 16
    assert torch.unique(loaded.fc3.weight[loaded.fc3.weight != 0]).numel() <= 64


def test_a_corrupt_quantized_file_is_a_clean_error(pruned_checkpoint, tmp_path):
    path, _ = pruned_checkpoint
    out = tmp_path / "q.prunet"
    export(path, out, quantize=5)
    raw = bytearray(out.read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "bad.prunet").write_bytes(bytes(raw))
    with pytest.raises(CompactFileError, match="corrupt"):
        load(tmp_path / "bad.prunet")
    (tmp_path / "short.prunet").write_bytes(bytes(raw[: len(raw) // 2]))
    with pytest.raises(CompactFileError):
        load(tmp_path / "short.prunet")


def test_quantized_export_errors_are_one_line(pruned_checkpoint, tmp_path):
    path, _ = pruned_checkpoint
    from prunet.sparse import ExportError

    with pytest.raises(ExportError, match="--bits"):
        export(path, tmp_path / "q.prunet", quantize=0)
    with pytest.raises(ExportError, match="compact format"):
        export(path, tmp_path / "q.onnx", format="onnx", quantize=5)


SHARED_RECIPE = copy.deepcopy(TINY_RECIPE)
SHARED_RECIPE["threads"] = 1
SHARED_RECIPE["quantize"] = {"bits": {"fc": 4, "fc3": 5}, "epochs": 1}


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason="dataset-fashion-mnist not installed")
@pytest.mark.slow
def test_a_run_with_weight_sharing_writes_the_shared_model_and_resumes_to_it(fast_data, tmp_path, monkeypatch):
    summary = run(recipe_from_dict(copy.deepcopy(SHARED_RECIPE)), run_dir=tmp_path / "a", log=lambda line: None)
    q = summary["quantize"]
    assert q["bits"] == {"fc1": 4, "fc2": 4, "fc3": 5} and q["bytes"] < summary["compact"]["bytes"] / 2
    shared = load(tmp_path / "a" / "final_shared.prunet")
    pruned = load(tmp_path / "a" / "final.prunet")
    for name in ("fc1", "fc2", "fc3"):
        w, p = getattr(shared, name).weight, getattr(pruned, name).weight
        assert torch.equal(w == 0, p == 0), name  # the same survivors: masks exact through the phase
        assert torch.unique(w[w != 0]).numel() <= 2 ** q["bits"][name]
    report = (tmp_path / "a" / "report.md").read_text()
    assert "Weight sharing + Huffman" in report
    stages = report[report.index("## Weight sharing and Huffman coding"):]
    fc1 = next(line for line in stages.splitlines() if line.startswith("| fc1 |")).split("|")
    dense, pruned, shared_b, coded = (int(c.strip().replace(",", "")) for c in fc1[6:10])
    assert dense == 4 * 235_200 and shared_b < pruned < dense and coded < pruned  # each stage smaller, per layer
    weight_bits, weight_bits_h = fc1[4].split("/")
    assert int(weight_bits) == 4 and float(weight_bits_h) <= 4.0  # Huffman never codes longer than fixed width

    stats = shared_stats(tmp_path / "a" / "final_shared.prunet")
    assert set(stats) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    kept = {row["layer"]: row["kept"] for row in summary["layers"]}
    for name, st in stats.items():
        layer = name.split(".")[0]
        assert st.survivors == kept[layer]  # every survivor of pruning stored as a cluster index
        assert st.weight_bits == q["bits"][layer] and st.index_bits >= st.gap_bits
        assert st.weight_bits_huffman <= st.weight_bits + 8 / st.survivors
        assert st.index_bits_huffman <= st.index_bits + 8 / st.survivors
        assert st.huffman_bytes == stored_bytes(tmp_path / "a" / "final_shared.prunet")[name]

    with monkeypatch.context() as mp:
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        mp.setattr(prunet.phases, "write_report", interrupted)
        with pytest.raises(KeyboardInterrupt):
            run(recipe_from_dict(copy.deepcopy(SHARED_RECIPE)), run_dir=tmp_path / "b", log=lambda line: None)
    resume(tmp_path / "b", log=lambda line: None)
    a, b = (load_file(str(tmp_path / f / "final_shared.prunet")) for f in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantize_recipe_errors_name_the_field():
    for quantize, match in [({"bits": 0}, "quantize.bits"), ({"bits": {"fc": 4.5}}, "whole number"),
                            ({"init": "random"}, "quantize.init"), ({"lr_fraction": 0}, "quantize.lr_fraction")]:
        with pytest.raises(ConfigError, match=match):
            recipe_from_dict({"quantize": quantize})


def test_a_bits_key_that_names_no_layer_is_an_error(pruned_checkpoint, tmp_path):
    path, _ = pruned_checkpoint
    from prunet.sparse import ExportError

    with pytest.raises(ExportError, match="'fc9' names no layer"):
        export(path, tmp_path / "q.prunet", quantize={"fc9": 4})


def test_the_bits_sweep_costs_accuracy_at_few_bits_and_none_at_enough(fashion):
    from prunet.analysis.bits import bits_sweep
    from prunet.config import TrainConfig
    from prunet.train import Normalization, fit

    torch.manual_seed(0)
    model = create_model("lenet_300_100")
    fit(model, fashion.train, fashion.val, TrainConfig(epochs=2, lr=0.05, momentum=0.9),
        Normalization(fashion.mean, fashion.std))
    Pruner(model).prune(Sparsity(0.9))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = bits_sweep(model, fashion.val, Normalization(fashion.mean, fashion.std), bits=(1, 16))
    one, sixteen = rows
    assert (one.group, one.bits, sixteen.bits) == ("fc", 1, 16)
    assert abs(sixteen.val_acc - one.base_acc) <= 0.5  # 2^16 values: as good as unshared
    assert one.val_acc < one.base_acc - 1  # 2 values per layer: clearly worse
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    with pytest.raises(ValueError, match="1..16"):
        bits_sweep(model, fashion.val, Normalization(fashion.mean, fashion.std), bits=(0,))


def test_prunet_bits_writes_its_table_and_figure(pruned_checkpoint, tmp_path, capsys, fast_data):
    from prunet.cli import main

    path, _ = pruned_checkpoint
    recipe = tmp_path / "r.yaml"
    recipe.write_text(__import__("yaml").safe_dump(TINY_RECIPE))
    assert main(["bits", str(tmp_path), "--recipe", str(recipe), "--values", "2,4"]) == 0
    assert (tmp_path / "bits.csv").read_text().count("\n") == 3 and (tmp_path / "bits.png").stat().st_size > 0
    assert main(["bits", str(tmp_path), "--recipe", str(recipe), "--values", "two"]) == 2
