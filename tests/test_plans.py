"""The plan cache: sparsify decides a layer (and a whole model) once per machine, and says so."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn as nn

from prunet.sparse import modules, native, plan, plans, sparsify
from prunet.sparse.plans import PlanCache, default_path


def mlp(seed: int = 0, density: float = 0.1) -> nn.Sequential:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 8)).eval()
    with torch.no_grad():
        for layer in (net[0], net[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) < density)
    return net


class Timings:
    """paired_seconds as sparsify calls it, on given ratios (sparse / dense), counting its calls."""

    def __init__(self, ratio: float):
        self.ratio, self.calls = ratio, 0

    def __call__(self, dense, sparse, repeats, prepare=None):
        self.calls += 1
        return [(1e-3, 1e-3 * self.ratio)] * repeats


def paths(model: nn.Module) -> dict[str, str]:
    return {name: reason.split(" (")[0] for name, reason in plan(model).items()}


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "plans.json"
    monkeypatch.setenv("PRUNET_PLAN_CACHE", str(path))
    return path


def test_a_second_run_keeps_the_first_runs_plan_without_timing(cache_file, monkeypatch):
    x = torch.randn(1, 64)
    fast = Timings(0.3)
    monkeypatch.setattr(modules, "paired_seconds", fast)
    first = sparsify(mlp(), x)
    assert fast.calls >= 3 and all(p.startswith("sparse") for p in paths(first).values())
    slow = Timings(2.0)  # the machine is loaded now: timed again, every layer would stay dense
    monkeypatch.setattr(modules, "paired_seconds", slow)
    second = sparsify(mlp(), x)
    assert slow.calls == 0
    assert paths(second) == paths(first) and all(r.endswith("timed on an earlier run)") for r in plan(second).values())
    assert json.loads(cache_file.read_text())["format"] == "prunet-plans"


def test_another_pattern_batch_or_margin_is_timed_again(cache_file, monkeypatch):
    x = torch.randn(1, 64)
    monkeypatch.setattr(modules, "paired_seconds", Timings(0.3))
    sparsify(mlp(), x)
    for model, inp, margin in [(mlp(seed=1), x, 0.9), (mlp(), torch.randn(8, 64), 0.9), (mlp(), x, 0.5)]:
        timings = Timings(2.0)
        monkeypatch.setattr(modules, "paired_seconds", timings)
        chosen = sparsify(model, inp, margin=margin)
        assert timings.calls >= 2 and set(paths(chosen).values()) == {"dense"}


def test_off_times_every_run(monkeypatch):
    monkeypatch.setenv("PRUNET_PLAN_CACHE", "off")
    assert default_path() is None
    x = torch.randn(1, 64)
    for ratio in (0.3, 2.0):
        timings = Timings(ratio)
        monkeypatch.setattr(modules, "paired_seconds", timings)
        chosen = sparsify(mlp(), x)
        assert timings.calls >= 2 and not any("earlier run" in r for r in plan(chosen).values())


def test_cache_false_or_a_path_overrides_the_environment(cache_file, tmp_path, monkeypatch):
    x = torch.randn(1, 64)
    monkeypatch.setattr(modules, "paired_seconds", Timings(0.3))
    sparsify(mlp(), x, cache=False)
    assert not cache_file.exists()
    other = tmp_path / "elsewhere" / "plans.json"
    sparsify(mlp(), x, cache=other)
    assert other.is_file() and not cache_file.exists()


def test_an_unreadable_cache_is_timed_afresh_and_rewritten(cache_file, monkeypatch):
    cache_file.write_text("{ not json")
    timings = Timings(0.3)
    monkeypatch.setattr(modules, "paired_seconds", timings)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        chosen = sparsify(mlp(), torch.randn(1, 64))
    assert timings.calls >= 2 and "sparse" in paths(chosen)["0"]
    assert PlanCache(cache_file).get("anything") is None and json.loads(cache_file.read_text())["entries"]


def test_a_cache_that_cannot_be_written_still_gives_a_plan(tmp_path, monkeypatch):
    blocker = tmp_path / "a file"
    blocker.write_text("")
    monkeypatch.setenv("PRUNET_PLAN_CACHE", str(blocker / "plans.json"))  # its folder is a file
    monkeypatch.setattr(modules, "paired_seconds", Timings(0.3))
    x = torch.randn(1, 64)
    net = mlp()
    expected = net(x)
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        chosen = sparsify(copy.deepcopy(net), x)
    with torch.no_grad():
        assert torch.allclose(chosen(x), expected, atol=1e-5)
    assert "sparse" in paths(chosen)["0"] and list(tmp_path.iterdir()) == [blocker]  # no temporary left


def test_threads_are_part_of_the_machine(cache_file, monkeypatch):
    x = torch.randn(1, 64)
    monkeypatch.setattr(modules, "paired_seconds", Timings(0.3))
    sparsify(mlp(), x)
    timings = Timings(2.0)
    monkeypatch.setattr(modules, "paired_seconds", timings)
    before = torch.get_num_threads()
    torch.set_num_threads(before + 1)
    try:
        sparsify(mlp(), x)
    finally:
        torch.set_num_threads(before)
    assert timings.calls >= 2


@pytest.mark.skipif(native.library().fastcall is None, reason=f"native kernel: {native.status()}")
def test_how_the_kernel_is_called_is_part_of_the_machine(cache_file, monkeypatch):
    """A decision timed while ctypes called the kernel is not reused once the extension module calls it (a
    small layer's time changes with the call's cost), nor the other way round."""
    x = torch.randn(1, 64)
    library = native.library()
    monkeypatch.setattr(modules, "paired_seconds", Timings(0.3))
    monkeypatch.setattr(native, "_library", dataclasses.replace(library, fastcall=None))
    sparsify(mlp(), x)
    timings = Timings(2.0)
    monkeypatch.setattr(modules, "paired_seconds", timings)
    monkeypatch.setattr(native, "_library", library)
    sparsify(mlp(), x)
    assert timings.calls >= 2


def test_an_entry_edited_into_nonsense_is_timed_again(cache_file, monkeypatch):
    x = torch.randn(1, 64)
    monkeypatch.setattr(modules, "paired_seconds", Timings(0.3))
    sparsify(mlp(), x)
    data = json.loads(cache_file.read_text())
    for entry in data["entries"].values():
        entry["value"] = {"sparse": "yes", "ratio": None, "reason": 3}
    cache_file.write_text(json.dumps(data))
    timings = Timings(2.0)
    monkeypatch.setattr(modules, "paired_seconds", timings)
    chosen = sparsify(mlp(), x)
    assert timings.calls >= 2 and set(paths(chosen).values()) == {"dense"}


def test_with_the_cache_off_nothing_is_hashed_and_a_gpu_is_never_asked(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("not to be called")

    monkeypatch.setattr(modules, "paired_seconds", Timings(0.3))
    with monkeypatch.context() as m:
        m.setattr(plans, "pattern", fail)  # hashing a big layer's pattern is work the cache alone needs
        sparsify(mlp(), torch.randn(1, 64), cache=False)
    monkeypatch.setattr(torch.cuda, "get_device_name", fail)  # asking would start CUDA on a GPU machine
    assert "threads" in plans.machine() and "cpu" in plans.layer_entry(mlp()[0], torch.randn(1, 64), "CSR", 0.9, 3)


def test_two_processes_keep_each_others_plans_and_odd_fields_do_not_crash(cache_file):
    first, second = PlanCache(cache_file), PlanCache(cache_file)
    assert first.get("a") is None and second.get("b") is None  # both read the (empty) file before either wrote
    first.put("a", {"ratio": 0.5})
    first.save()
    second.put("b", {"ratio": 0.7})
    second.save()
    assert PlanCache(cache_file).get("a") == {"ratio": 0.5} and PlanCache(cache_file).get("b") == {"ratio": 0.7}
    data = json.loads(cache_file.read_text())
    for entry in data["entries"].values():
        entry["measured"] = None
    cache_file.write_text(json.dumps(data))
    third = PlanCache(cache_file)
    third.put("c", {"ratio": 0.9})
    third.save()
    assert PlanCache(cache_file).get("c") == {"ratio": 0.9}
