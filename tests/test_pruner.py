"""The Pruner: which parameters it targets, how settings resolve, and the guarantees of torch's own prune tests.

1. masked entries get exactly zero gradient;
2. pruned entries stay exactly zero through 50 steps of SGD (momentum, weight
   decay), Adam (weight decay) and AdamW, whether the masks are enforced by
   ``attach`` or by hand, or only by the gradient hooks, and even when the
   optimizer had dense state before pruning;
3. parameter identity is unchanged, so optimizers built earlier keep working.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import prunet
from prunet import GlobalMagnitude, Pruner, Sparsity, Threshold
from prunet.checkpoint import load_checkpoint, save_checkpoint
from prunet.models import create_model
from prunet.criteria import Criterion

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=1e-2),
    "sgd_nesterov": lambda params: torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "adam": lambda params: torch.optim.Adam(params, lr=1e-2, weight_decay=1e-2),
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-2, weight_decay=1e-2),
}
# How the masks are kept after each step: the step post-hook, a manual enforce(), or
# nothing but the gradient hooks (and the state cleaned at pruning time).
MODES = ["attach", "enforce", "hooks_only"]


def train_steps(model, opt, pruner, mode, steps, seed=0, accumulate=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        opt.zero_grad()
        for _ in range(accumulate):
            x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
            F.cross_entropy(model(x), y).backward()
        opt.step()
        if mode == "enforce":
            pruner.enforce()


def assert_pruned_are_zero(pruner: Pruner) -> None:
    for t in pruner.targets:
        pruned = t.mask == 0
        assert bool(pruned.any()), f"{t.param}: nothing pruned, the check would be vacuous"
        assert bool((t.weight.detach()[pruned] == 0).all()), f"{t.param}: a pruned weight moved"


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- targets ----------------------------------------------------------------------------------


def test_default_targets_are_linear_and_conv_weights_not_biases():
    pruner = Pruner(create_model("lenet_5"))
    assert [t.param for t in pruner.targets] == ["conv1.weight", "conv2.weight", "fc1.weight", "fc2.weight"]
    assert [t.kind for t in pruner.targets] == ["conv", "conv", "fc", "fc"]
    assert not any(k.endswith("bias_prunet_mask") for k in pruner.model.state_dict())


def test_masks_in_state_dict_under_stable_names(lenet):
    model = lenet()
    Pruner(model).prune(Threshold(1.0))
    state = model.state_dict()
    for layer in ("fc1", "fc2", "fc3"):
        mask = state[f"{layer}.weight_prunet_mask"]
        assert mask.shape == state[f"{layer}.weight"].shape
        assert set(mask.unique().tolist()) == {0, 1}  # 1 kept, 0 pruned
        assert f"{layer}.bias_prunet_mask" not in state
        assert bool((state[f"{layer}.weight"][mask == 0] == 0).all())


def test_include_and_exclude_patterns(lenet):
    pruner = Pruner(lenet(), include=["fc1.weight", "fc2.bias"])
    assert [t.param for t in pruner.targets] == ["fc1.weight", "fc2.bias"]
    pruner = Pruner(lenet(), exclude=["fc3"])
    assert [t.param for t in pruner.targets] == ["fc1.weight", "fc2.weight"]
    pruner = Pruner(lenet(), include=["*.weight"], exclude=["fc2"])
    assert [t.param for t in pruner.targets] == ["fc1.weight", "fc3.weight"]


def test_included_bias_is_pruned(lenet):
    model = lenet()
    pruner = Pruner(model, include=["*.bias"])
    pruner.prune(Sparsity(0.5))
    assert int(model.fc1.bias_prunet_mask.sum()) == 150
    assert int((model.fc1.bias.detach() == 0).sum()) == 150


def test_no_target_is_an_error(lenet):
    with pytest.raises(ValueError, match="'nothing_is_called_this' names no parameter of Sequential"):
        Pruner(lenet(), include=["nothing_is_called_this"])
    with pytest.raises(ValueError, match=r"no prunable parameters found in Sequential: prunes 0 of 40 matrix weights "
                                         r"\(0.0%\); skipped: embeddings 40 \(0.weight; opt-in: include embed or all"):
        Pruner(nn.Sequential(nn.Embedding(10, 4)))


class TwoBranch(nn.Module):
    """A user-defined, non-Sequential module: attributes used in forward, a nested block."""

    def __init__(self):
        super().__init__()
        self.features = nn.Conv2d(1, 4, 3)
        self.block = nn.ModuleDict({"proj": nn.Linear(4 * 26 * 26, 16)})
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        h = F.relu(self.features(x)).flatten(1)
        return self.head(F.relu(self.block["proj"](h)))


def test_pruner_on_a_custom_module():
    torch.manual_seed(0)
    model = TwoBranch()
    pruner = Pruner(model)
    assert [(t.layer, t.kind) for t in pruner.targets] == [("features", "conv"), ("block.proj", "fc"), ("head", "fc")]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    pruner.attach(opt)
    rows = pruner.prune(Sparsity({"conv": 0.5, "block.*": 0.9, "head": 0.2}), optimizer=opt)
    assert {k: r.kept for k, r in rows.items()} == {"features": 18, "block.proj": 4326, "head": 128}
    train_steps(model, opt, pruner, "attach", steps=10)
    assert_pruned_are_zero(pruner)
    x = torch.randn(4, 1, 28, 28)
    expected = model(x).detach()
    assert torch.equal(pruner.bake()(x).detach(), expected)


def test_only_named_layers_are_pruned(lenet):
    model = lenet()
    rows = Pruner(model).prune(Threshold({"fc1": 1.0}))
    assert rows["fc1"].kept < rows["fc1"].weights
    assert rows["fc2"].kept == rows["fc2"].weights and rows["fc3"].kept == rows["fc3"].weights


def test_setting_naming_no_layer_is_an_error(lenet):
    pruner = Pruner(lenet())
    with pytest.raises(ValueError, match="fc_1"):
        pruner.prune(Threshold({"fc_1": 1.0}))


def test_select_by_name_group_and_glob():
    pruner = Pruner(create_model("lenet_5"))
    assert [t.layer for t in pruner.select(["conv"])] == ["conv1", "conv2"]
    assert [t.layer for t in pruner.select(["fc2", "conv1"])] == ["conv1", "fc2"]
    assert [t.layer for t in pruner.select(["*1"])] == ["conv1", "fc1"]
    assert len(pruner.select(None)) == len(pruner.select(["all"])) == 4


def test_select_unknown_layer_lists_the_layers(lenet):
    pruner = Pruner(lenet())
    with pytest.raises(ValueError) as err:
        pruner.prune(Threshold(1.0), layers=["fc1", "fc9"])
    message = str(err.value)
    assert "fc9" in message and "fc1, fc2, fc3" in message
    assert "'fc1'" not in message.split("layers are")[0]  # only the unknown key is blamed
    assert int(pruner.model.fc1.weight_prunet_mask.sum()) == 235200  # nothing pruned on error


def test_prune_restricted_to_layers(lenet):
    rows = Pruner(lenet()).prune(Sparsity(0.5), layers=["fc2"])
    assert [r.kept for r in rows.values()] == [235200, 15000, 1000]


def test_global_magnitude_across_selected_layers(lenet):
    pruner = Pruner(lenet())
    rows = pruner.prune(GlobalMagnitude(0.9), layers=["fc1", "fc2"])
    assert rows["fc1"].kept + rows["fc2"].kept == round(0.1 * (235200 + 30000))
    assert rows["fc3"].kept == 1000


# --- the three guarantees ---------------------------------------------------------------------


@pytest.mark.parametrize("dense_state", [False, True], ids=["fresh_optimizer", "dense_state"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_pruned_weights_stay_zero_through_50_steps(lenet, opt_name, mode, dense_state):
    model = lenet()
    params_before = list(model.parameters())
    opt = OPTIMIZERS[opt_name](model.parameters())
    if dense_state:
        train_steps(model, opt, None, "dense", steps=5, seed=1)
    pruner = Pruner(model)
    if dense_state:
        # The test is only meaningful if the state would move the soon-pruned weights.
        assert all(v.abs().sum() > 0 for s in opt.state.values() for v in s.values() if v.dim() > 1)
    pruner.prune(Threshold({"fc1": 1.0, "fc2": 1.0, "fc3": 0.5}), optimizer=opt)
    if mode == "attach":
        pruner.attach(opt)
    for t in pruner.targets:
        for key, value in opt.state.get(t.weight, {}).items():
            if value.shape == t.weight.shape:
                assert bool((value[t.mask == 0] == 0).all()), f"{key} of {t.param} not zeroed"
    masks = {k: m.clone() for k, m in pruner.masks.items()}
    kept_before = {t.param: t.weight.detach()[t.mask != 0].clone() for t in pruner.targets}

    train_steps(model, opt, pruner, mode, steps=50)

    assert_pruned_are_zero(pruner)
    assert all(torch.equal(pruner.masks[k], m) for k, m in masks.items())  # training never edits masks
    assert all(p is q for p, q in zip(model.parameters(), params_before))  # identity kept
    for t in pruner.targets:  # and the optimizer still trains the survivors
        assert not torch.equal(t.weight.detach()[t.mask != 0], kept_before[t.param]), t.param


@pytest.mark.parametrize("mode", MODES)
def test_gradient_accumulation(lenet, mode):
    model = lenet()
    opt = OPTIMIZERS["sgd"](model.parameters())
    pruner = Pruner(model)
    pruner.prune(Threshold(1.0), optimizer=opt)
    if mode == "attach":
        pruner.attach(opt)
    g = torch.Generator().manual_seed(0)
    opt.zero_grad()
    for _ in range(4):
        x, y = torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)
        F.cross_entropy(model(x), y).backward()
        for t in pruner.targets:
            assert bool((t.weight.grad[t.mask == 0] == 0).all())
    opt.step()
    train_steps(model, opt, pruner, mode, steps=10, accumulate=3)
    assert_pruned_are_zero(pruner)


def test_optimizer_built_before_pruner_keeps_working(lenet, mnist_batch):
    model = lenet()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ids = [id(p) for p in model.parameters()]
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.8), optimizer=opt)
    assert [id(p) for p in model.parameters()] == ids
    assert [id(p) for p in opt.param_groups[0]["params"]] == ids
    before = snapshot(model)
    x, y = mnist_batch()
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()
    assert not torch.equal(model.fc1.weight.detach(), before["fc1.weight"])
    assert_pruned_are_zero(pruner)


def test_attach_cleans_existing_state_at_once(lenet):
    model = lenet()
    opt = OPTIMIZERS["sgd"](model.parameters())
    train_steps(model, opt, None, "dense", steps=3)
    pruner = Pruner(model)
    pruner.prune(Threshold(1.0))  # the optimizer is not told here...
    pruner.attach(opt)  # ...attach cleans its state now, before any step
    for t in pruner.targets:
        assert bool((opt.state[t.weight]["momentum_buffer"][t.mask == 0] == 0).all())


def test_model_cast_to_float64_keeps_pruning(lenet):
    model = lenet()
    opt = OPTIMIZERS["sgd"](model.parameters())
    pruner = Pruner(model)
    pruner.attach(opt)
    pruner.prune(Threshold(1.0), optimizer=opt)
    kept = [r.kept for r in pruner.summary()]
    model.double()
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        opt.zero_grad()
        x = torch.randn(8, 1, 28, 28, generator=g, dtype=torch.float64)
        F.cross_entropy(model(x), torch.randint(0, 10, (8,), generator=g)).backward()
        opt.step()
    assert_pruned_are_zero(pruner)
    assert [r.kept for r in pruner.summary()] == kept
    pruner.prune(Threshold(1.0), optimizer=opt)
    assert all(r.kept < k for r, k in zip(pruner.summary(), kept))


def test_enforce_rezeroes_weights_written_by_hand(lenet):
    model = lenet()
    pruner = Pruner(model)
    pruner.prune(Threshold(1.0))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.5)
    pruner.enforce()
    assert_pruned_are_zero(pruner)


# --- masks only shrink ------------------------------------------------------------------------


class AllOnes(Criterion):
    """A criterion that would revive every connection if the pruner let it."""

    def masks(self, targets):
        return {t.param: torch.ones_like(t.weight, dtype=torch.bool) for t in targets}


def test_masks_only_lose_entries_from_prune_to_prune(lenet):
    model = lenet()
    opt = OPTIMIZERS["sgd"](model.parameters())
    pruner = Pruner(model)
    pruner.attach(opt)
    history = []
    for criterion in (Threshold(1.0), Sparsity(0.5), AllOnes(), Threshold(0.3), GlobalMagnitude(0.95)):
        pruner.prune(criterion, optimizer=opt)
        history.append({k: m.clone() for k, m in pruner.masks.items()})
        train_steps(model, opt, pruner, "attach", steps=5)
    for earlier, later in zip(history, history[1:]):
        for k in earlier:
            assert not bool(((later[k] != 0) & (earlier[k] == 0)).any()), f"{k} regained a connection"
    assert all(torch.equal(history[2][k], history[1][k]) for k in history[1])  # AllOnes changed nothing
    assert pruner.compression() == pytest.approx(20.0, rel=1e-3)


def test_summary_and_compression(lenet):
    pruner = Pruner(lenet())
    assert pruner.compression() == 1.0
    pruner.prune(Sparsity({"fc1": 0.9, "fc2": 0.5}))
    rows = pruner.summary()
    assert [(r.layer, r.shape, r.weights, r.kept) for r in rows] == [
        ("fc1", (300, 784), 235200, 23520),
        ("fc2", (100, 300), 30000, 15000),
        ("fc3", (10, 100), 1000, 1000),
    ]
    assert rows[1].kept_frac == 0.5
    assert pruner.compression() == pytest.approx(266200 / (23520 + 15000 + 1000))


class PruneFirst(Criterion):
    """Prunes the first ``k`` entries of each layer: exact, known counts."""

    def __init__(self, k: int):
        self.k = k

    def masks(self, targets):
        out = {}
        for t in targets:
            mask = torch.ones(t.weight.numel(), dtype=torch.bool)
            mask[: self.k] = False
            out[t.param] = mask.view_as(t.weight)
        return out


def test_kept_count_exact_for_a_layer_larger_than_float32_counts():
    # AlexNet fc6 has 37.7M weights, VGG-16 fc6 103M; 16,793,597 is odd and above 2**24,
    # so no float32 sum can represent it.
    layer = torch.nn.utils.skip_init(nn.Linear, 4096, 4100, bias=False)
    with torch.no_grad():
        layer.weight.fill_(1.0)
    pruner = Pruner(nn.Sequential(layer))
    rows = pruner.prune(PruneFirst(3))
    assert rows["0"].kept == 4100 * 4096 - 3


def test_second_pruner_on_the_same_model_then_bake(lenet, mnist_batch):
    """E.g. ``model, pruner, _ = load_checkpoint(path)`` and then ``Pruner(model)`` as the docstring suggests."""
    model = lenet()
    Pruner(model).prune(Threshold(1.0))
    again = Pruner(model)  # the masks are found and kept
    assert again.compression() > 2
    plain = again.bake()
    x, y = mnist_batch()
    F.cross_entropy(plain(x), y).backward()
    assert bool((plain.fc1.weight.grad != 0).any())


# --- save, reload, keep training --------------------------------------------------------------


def pruned_and_trained(lenet, opt_name="sgd"):
    model = lenet()
    opt = OPTIMIZERS[opt_name](model.parameters())
    pruner = Pruner(model)
    pruner.attach(opt)
    train_steps(model, opt, pruner, "attach", steps=3, seed=1)
    pruner.prune(Threshold({"fc1": 1.0, "fc2": 1.0, "fc3": 0.5}), optimizer=opt)
    train_steps(model, opt, pruner, "attach", steps=5, seed=2)
    return model, opt, pruner


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_reload_into_fresh_model_with_optimizer_state(lenet, opt_name, mode):
    model, opt, pruner = pruned_and_trained(lenet, opt_name)
    model_state, opt_state = model.state_dict(), opt.state_dict()

    fresh = lenet(seed=1)
    fresh_pruner = Pruner(fresh)
    fresh.load_state_dict(model_state)
    fresh_opt = OPTIMIZERS[opt_name](fresh.parameters())
    fresh_opt.load_state_dict(opt_state)
    if mode == "attach":
        fresh_pruner.attach(fresh_opt)
    assert all(torch.equal(fresh_pruner.masks[k], m) for k, m in pruner.masks.items())

    train_steps(fresh, fresh_opt, fresh_pruner, mode, steps=50, seed=3)
    assert_pruned_are_zero(fresh_pruner)
    assert all(torch.equal(fresh_pruner.masks[k], m) for k, m in pruner.masks.items())


def test_reload_through_checkpoint_then_train(lenet, tmp_path):
    model, _, pruner = pruned_and_trained(lenet)
    path = save_checkpoint(tmp_path / "pruned.safetensors", model, {"model": "lenet_300_100", "model_kwargs": {}})
    loaded, loaded_pruner, meta = load_checkpoint(path)
    assert meta["model"] == "lenet_300_100"
    assert [t.param for t in loaded_pruner.targets] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert all(torch.equal(loaded_pruner.masks[k], m) for k, m in pruner.masks.items())
    opt = OPTIMIZERS["adamw"](loaded.parameters())
    loaded_pruner.attach(opt)
    train_steps(loaded, opt, loaded_pruner, "attach", steps=50)
    assert_pruned_are_zero(loaded_pruner)


# --- bake -------------------------------------------------------------------------------------


def test_bake_outputs_equal_and_machinery_gone(lenet, mnist_batch):
    model, opt, pruner = pruned_and_trained(lenet)
    x, y = mnist_batch(32)
    model.eval()
    expected = model(x).detach()
    pruned = {k: m == 0 for k, m in pruner.masks.items()}

    plain = pruner.bake()
    assert plain is model
    assert torch.equal(plain(x).detach(), expected)
    assert not any(k.endswith("_mask") for k in plain.state_dict())
    assert pruner.targets == []

    # Hooks are gone: gradients reach the pruned entries and a step moves them.
    opt.zero_grad()
    F.cross_entropy(plain(x), y).backward()
    assert bool((plain.fc1.weight.grad[pruned["fc1.weight"]] != 0).any())
    opt.step()
    assert bool((plain.fc1.weight.detach()[pruned["fc1.weight"]] != 0).any())


def test_baked_model_equals_a_hand_masked_copy(lenet, mnist_batch):
    """The exported model computes what a plain model with weights * mask computes."""
    model, _, pruner = pruned_and_trained(lenet)
    reference = lenet(seed=5)
    with torch.no_grad():
        for name, p in reference.named_parameters():
            mask = model.state_dict().get(name + "_prunet_mask")
            src = model.state_dict()[name]
            p.copy_(src * mask if mask is not None else src)
    x, _ = mnist_batch(32)
    assert torch.equal(pruner.bake()(x), reference(x))


def _step(model, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.step()


def test_criterion_given_to_the_constructor(lenet):
    pruner = Pruner(lenet(), Sparsity(0.5))
    rows = pruner.prune()
    assert rows["fc1"].kept == 235_200 // 2
    with pytest.raises(ValueError, match="needs a criterion"):
        Pruner(lenet()).prune()


def test_reloading_old_optimizer_state_does_not_revive_pruned_weights(lenet, mnist_batch):
    model = lenet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = mnist_batch()
    _step(model, opt, x, y)
    dense_state = copy.deepcopy(opt.state_dict())  # momentum everywhere
    pruner = Pruner(model)
    pruner.attach(opt)
    pruner.prune(Sparsity(0.9))
    opt.load_state_dict(dense_state)
    buf = opt.state[model.fc1.weight]["momentum_buffer"]
    assert torch.count_nonzero(buf[model.fc1.weight_prunet_mask == 0]) == 0
    pruner.bake()  # no more enforcement: only clean state keeps the weights at zero
    pruned = model.fc1.weight == 0
    for _ in range(3):
        opt.zero_grad()
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        model.fc1.weight.grad[pruned] = 0  # freeze the pattern by hand, as a fine-tuning user might
        opt.step()
    assert torch.count_nonzero(model.fc1.weight[pruned]) == 0


def test_prune_cleans_the_state_of_attached_optimizers(lenet, mnist_batch):
    model = lenet()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    pruner = Pruner(model)
    pruner.attach(opt)
    _step(model, opt, *mnist_batch())
    pruner.prune(Sparsity(0.8))  # no optimizer= here: the attached one is cleaned anyway
    pruned = model.fc2.weight_prunet_mask == 0
    for key in ("exp_avg", "exp_avg_sq"):
        assert torch.count_nonzero(opt.state[model.fc2.weight][key][pruned]) == 0


def test_loading_dense_weights_keeps_pruned_weights_at_zero(lenet):
    model = lenet()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    pruner = Pruner(model)
    pruner.prune(Sparsity(0.5))
    model.load_state_dict(dense, strict=False)  # weights only: the masks stay
    assert torch.count_nonzero(model.fc1.weight[model.fc1.weight_prunet_mask == 0]) == 0
    assert pruner.summary()[0].kept == 235_200 // 2


class _Jitter(torch.optim.Optimizer):
    """Moves every entry, gradient or not: the case the per-step multiply exists for."""

    def __init__(self, params):
        super().__init__(params, {})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(0.01)


def test_an_optimizer_that_moves_zero_gradient_weights_is_enforced_every_step(lenet, mnist_batch):
    model = lenet()
    opt = _Jitter(model.parameters())
    pruner = Pruner(model)
    pruner.attach(opt)
    pruner.prune(Sparsity(0.7))
    for _ in range(5):
        _step(model, opt, *mnist_batch())
    for t in pruner.targets:
        assert torch.count_nonzero(t.weight[t.mask == 0]) == 0


def test_first_order_optimizers_skip_the_per_step_multiply(lenet, mnist_batch):
    """Masked gradients and clean state alone keep SGD with momentum and weight decay exact."""
    model = lenet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-2)
    _step(model, opt, *mnist_batch())
    pruner = Pruner(model)
    pruner.attach(opt)
    pruner.prune(Sparsity(0.7))
    multiplies = []
    pruner.enforce = lambda: multiplies.append(1)  # the multiply after a step, if it ran
    for i in range(20):
        _step(model, opt, *mnist_batch(seed=i))
    assert multiplies == []
    for t in pruner.targets:
        assert torch.count_nonzero(t.weight[t.mask == 0]) == 0


@pytest.mark.parametrize("criterion", [prunet.Threshold({"fc1": 1.0, "fc2": 0.8, "fc3": 0.5}),
                                       prunet.TargetThreshold(12.0, {"fc": 1.0, "fc3": 0.5}),
                                       prunet.GlobalMagnitude(0.9)])
def test_a_device_without_float64_prunes_on_a_cpu_copy_to_the_same_masks(lenet, monkeypatch, criterion):
    """Apple's MPS has no float64: there the criterion runs on a CPU copy. Forced here on the CPU itself."""
    import prunet.pruner

    direct, shadowed = lenet(), lenet()
    a, b = prunet.Pruner(direct), prunet.Pruner(shadowed)
    a.prune(prunet.Threshold(0.3))
    b.prune(prunet.Threshold(0.3))
    a.prune(criterion, layers=["fc1", "fc2"] if isinstance(criterion, prunet.Threshold) else None)
    monkeypatch.setattr(prunet.pruner, "NO_FLOAT64", ("cpu",))
    b.prune(criterion, layers=["fc1", "fc2"] if isinstance(criterion, prunet.Threshold) else None)
    for name in a.masks:
        assert torch.equal(a.masks[name], b.masks[name]), name
    assert torch.equal(direct.fc3.weight, shadowed.fc3.weight)
