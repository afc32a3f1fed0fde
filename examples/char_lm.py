"""A character-level language model, pruned: a tiny causal transformer on Python's own standard library.

Everything a user brings is here: the corpus loader, the model, the training loop. prunet adds
``Pruner`` (masks), ``PruningSchedule`` (when to prune, in this loop), ``save`` / ``export`` /
``load`` and, through the recipe ``examples/char_lm.yaml``, the whole run with its report.

* **Corpus** (:func:`stdlib_corpus`): the top-level ``*.py`` files of the running Python's
  standard library (``sysconfig.get_paths()["stdlib"]``), sorted by name, taken whole until
  ``max_chars`` is reached and cut there. It ships with every Python, so nothing is downloaded;
  the file list, the character count and a SHA-256 of the text say exactly what was read.
  Characters outside printable ASCII and newline map to one ``unknown`` symbol (a fixed
  vocabulary of 97: no choice is made on the data).
* **Splits** (:func:`split_by_position`): by position, never shuffled: the corpus is cut in ten
  consecutive pieces, and of each the first 90% trains, the next 5% validates (chooses epochs),
  the last 5% tests (only reported).
* **Model** (:class:`CharGPT`): token and position embeddings, ``nn.TransformerEncoder`` with
  pre-norm layers and a causal mask, a linear head over the vocabulary.
* **Loop** (:func:`train`): AdamW, a cosine learning rate per epoch, the best epoch on
  validation kept; a :class:`prunet.schedule.PruningSchedule` prunes when it says so.

``prunet.Pruner(model)`` with its defaults prunes the linear layers (feed-forward, the
attention's output projection, the head) and the attention in-projections
(``blocks.layers.N.self_attn``, group ``attn``); embeddings stay dense (opt-in: ``embed``).

Run it (about 20 minutes on 2 quiet cores: dense, pruned gradually to 10x, export, load)::

    python examples/char_lm.py --target 10 --out runs/char_lm_own

or through a recipe (the same model and data, prunet's loop, a run folder and its report)::

    prunet run examples/char_lm.yaml

``benchmarks/bench_lm.py`` measures both, beside ``torch.nn.utils.prune``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import sys
import sysconfig
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

import prunet
from prunet.factory import absolute
from prunet.schedule import PruneEvent, PruningSchedule

# ---- the vocabulary: fixed, not learnt from the data ---------------------------------------------------------

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # newline and printable ASCII
UNKNOWN = len(VOCAB)  # every other character (tabs, accents, symbols)
VOCAB_SIZE = len(VOCAB) + 1  # 97
_LOOKUP = torch.full((128,), UNKNOWN, dtype=torch.int64)
_LOOKUP[torch.tensor([ord(c) for c in VOCAB])] = torch.arange(len(VOCAB))


def encode(text: str) -> torch.Tensor:
    """Character ids of ``text`` (int64, one per character).

    >>> encode("a\\tb\\n").tolist()
    [66, 96, 67, 0]
    """
    codes = torch.tensor([min(ord(c), 127) for c in text], dtype=torch.int64)
    return _LOOKUP[codes]


def decode(ids: torch.Tensor | list[int]) -> str:
    """The text of character ids (the unknown symbol as ``\\ufffd``).

    >>> decode(encode("def f():\\n"))
    'def f():\\n'
    """
    return "".join(VOCAB[i] if i < len(VOCAB) else "\ufffd" for i in (ids.tolist() if torch.is_tensor(ids) else ids))


# ---- the corpus ----------------------------------------------------------------------------------------------

@dataclass
class Corpus:
    """A text and where it came from.

    Attributes:
        text: the characters, as read (before the vocabulary maps them).
        root: the folder the files are in.
        files: the files read, in order, relative to ``root`` (the last may be cut).
        python: the Python version whose standard library this is (empty for another folder).
    """

    text: str
    root: str
    files: list[str] = field(default_factory=list)
    python: str = ""

    @property
    def chars(self) -> int:
        return len(self.text)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        """What a results file records: which files, how many characters, the text's hash."""
        unknown = int((encode(self.text) == UNKNOWN).sum())
        return {"source": "Python standard library, top-level *.py files sorted by name", "root": self.root,
                "python": self.python, "files": self.files, "n_files": len(self.files), "chars": self.chars,
                "unknown_chars": unknown, "sha256": self.sha256, "vocab_size": VOCAB_SIZE}


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """The top-level ``*.py`` files of the standard library (or of ``root``), sorted by name."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    return sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: p.name)


def stdlib_corpus(max_chars: int = 400_000, root: str | Path | None = None) -> Corpus:
    """Whole standard-library files in name order until ``max_chars`` characters, the last one cut.

    Args:
        max_chars: the corpus length (fewer if the files hold fewer).
        root: the folder to read (default: this Python's ``sysconfig.get_paths()["stdlib"]``).

    Raises:
        FileNotFoundError: the folder holds no ``*.py`` file.
    """
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = stdlib_files(root)
    if not files:
        raise FileNotFoundError(f"no *.py files in {root}")
    parts, used, n = [], [], 0
    for path in files:
        if n >= max_chars:
            break
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text[: max_chars - n])
        used.append(path.name)
        n += len(parts[-1])
    # Whose library this is: the running Python's, unless another folder was given.
    version = ".".join(map(str, sys.version_info[:3])) if root == Path(sysconfig.get_paths()["stdlib"]) else ""
    return Corpus("".join(parts), str(root), used, version)


def split_by_position(n: int, val_fraction: float = 0.05, test_fraction: float = 0.05,
                      pieces: int = 10) -> tuple[list[slice], list[slice], list[slice]]:
    """Train, validation and test ranges of ``n`` positions: ``pieces`` equal consecutive parts, each cut
    into train, validation and test in that order (never shuffled).

    Cut in pieces, validation and test each sample the whole corpus (ten places in as many files)
    rather than its last few files, which would make validation the continuation of the file the
    training text ends in and test a few other files.

    >>> train, val, test = split_by_position(200, pieces=2)
    >>> train, val, test
    ([slice(0, 90, None), slice(100, 190, None)], [slice(90, 95, None), slice(190, 195, None)], \
[slice(95, 100, None), slice(195, 200, None)])
    """
    if not (0 < val_fraction and 0 < test_fraction and val_fraction + test_fraction < 1) or pieces < 1:
        raise ValueError(f"fractions must be > 0 and leave some training data, and pieces >= 1; got "
                         f"{val_fraction}, {test_fraction}, {pieces}")
    bounds = [round(n * k / pieces) for k in range(pieces + 1)]
    train, val, test = [], [], []
    for a, b in zip(bounds, bounds[1:]):
        t = b - round((b - a) * test_fraction)
        v = t - round((b - a) * val_fraction)
        train.append(slice(a, v))
        val.append(slice(v, t))
        test.append(slice(t, b))
    return train, val, test


def take(ids: torch.Tensor, ranges: list[slice]) -> torch.Tensor:
    """The positions of ``ranges``, in order, as one sequence."""
    return torch.cat([ids[r] for r in ranges])


class CharWindows(Dataset):
    """Non-overlapping windows of ``block`` characters, each with the next character at every position.

    Example ``i`` is ``(ids[i·block : (i+1)·block], ids[i·block + 1 : (i+1)·block + 1])``; the last
    target stays inside ``ids``, so windows of one split never read another's characters.
    """

    def __init__(self, ids: torch.Tensor, block: int):
        if len(ids) < block + 1:
            raise ValueError(f"{len(ids)} characters make no window of {block} + 1")
        self.ids, self.block = ids, block

    def __len__(self) -> int:
        return (len(self.ids) - 1) // self.block

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = i * self.block
        return self.ids[s: s + self.block], self.ids[s + 1: s + self.block + 1]

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Windows ``index`` as one batch: ``(B, block)`` inputs and targets."""
        starts = index[:, None] * self.block + torch.arange(self.block)  # (B, block)
        return self.ids[starts], self.ids[starts + 1]


@dataclass
class CharData:
    """The three splits of a corpus as windows, and the corpus they come from."""

    train: CharWindows
    val: CharWindows
    test: CharWindows
    corpus: Corpus

    def describe(self) -> dict:
        return {**self.corpus.describe(), "block": self.train.block,
                "split_chars": {k: len(getattr(self, k).ids) for k in ("train", "val", "test")},
                "windows": {k: len(getattr(self, k)) for k in ("train", "val", "test")}}


def char_data(max_chars: int = 400_000, block: int = 64, val_fraction: float = 0.05, test_fraction: float = 0.05,
              root: str | Path | None = None) -> CharData:
    """The corpus, encoded and split by position into windows of ``block`` characters."""
    corpus = stdlib_corpus(max_chars, root)
    ids = encode(corpus.text)
    tr, va, te = split_by_position(len(ids), val_fraction, test_fraction)
    return CharData(CharWindows(take(ids, tr), block), CharWindows(take(ids, va), block),
                    CharWindows(take(ids, te), block), corpus)


def char_splits(max_chars: int = 400_000, block: int = 64, val_fraction: float = 0.05,
                test_fraction: float = 0.05, root: str | None = None) -> dict:
    """The data factory of ``examples/char_lm.yaml``: ``{"train", "val", "test"}`` datasets of
    ``(ids, next ids)`` windows (``root``: another folder of ``*.py`` files than this Python's library)."""
    d = char_data(max_chars, block, val_fraction, test_fraction, root)
    return {"train": d.train, "val": d.val, "test": d.test}


# ---- the model -----------------------------------------------------------------------------------------------

class CharGPT(nn.Module):
    """A GPT-style causal transformer over characters: ``(B, T)`` ids -> ``(B, T, vocab)`` logits.

    Args:
        vocab: vocabulary size.
        block: the longest context (position embeddings).
        d_model, layers, heads: width, depth and attention heads.
        ffn: the feed-forward width as a multiple of ``d_model``.
        dropout: dropout in every layer.
    """

    def __init__(self, vocab: int = VOCAB_SIZE, block: int = 64, d_model: int = 128, layers: int = 2, heads: int = 4,
                 ffn: int = 4, dropout: float = 0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Embedding(block, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, ffn * d_model, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)
        for e in (self.embed, self.pos):
            nn.init.normal_(e.weight, std=0.02)
        # not in the state dict: rebuilt with the model
        self.register_buffer("causal", nn.Transformer.generate_square_subsequent_mask(block), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        T = ids.shape[1]
        h = self.embed(ids) + self.pos.weight[:T]  # (B, T, d_model)
        h = self.blocks(h, mask=self.causal[:T, :T], is_causal=True)
        return self.head(h)  # (B, T, vocab)


def char_gpt(block: int = 64, d_model: int = 128, layers: int = 2, heads: int = 4, ffn: int = 4,
             dropout: float = 0.0) -> CharGPT:
    """The model factory of ``examples/char_lm.yaml``."""
    return CharGPT(VOCAB_SIZE, block, d_model, layers, heads, ffn, dropout)


# ---- the user's own loop -------------------------------------------------------------------------------------

@torch.no_grad()
def bits_per_char(model: nn.Module, windows: CharWindows, batch_size: int = 256) -> float:
    """Mean cross-entropy in bits over every predicted character of ``windows``."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    nats, n = 0.0, 0
    for i in range(0, len(windows), batch_size):
        x, y = windows.batch(torch.arange(i, min(i + batch_size, len(windows))))
        x, y = x.to(device), y.to(device)
        logits = model(x)
        nats += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="sum").item()
        n += y.numel()
    model.train(was)
    return nats / n / math.log(2)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only (not biases, norms): as prunet's own loop does."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() > 1], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() <= 1], "weight_decay": 0.0}]


def cosine_lr(epoch: int, epochs: int, lr: float) -> float:
    """The rate of ``epoch`` (from 0): half a cosine from ``lr`` over the epochs, as ``lr_schedule: cosine``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


@dataclass
class LoopConfig:
    """One call of :func:`train`: ``epochs`` passes over the training windows."""

    epochs: int = 4
    lr: float = 3e-3
    batch_size: int = 32
    weight_decay: float = 0.01
    seed: int = 0
    warmup_steps: int = 0  # the rate rises linearly over the first steps of each call (a wide model from scratch
    #                        needs it); the epoch's logged rate is the cosine one, before the warm-up


def train(model: nn.Module, data: CharData, cfg: LoopConfig, schedule: PruningSchedule | None = None,
          log: Callable[[str], None] = print, label: str = "") -> list[dict]:
    """Train ``model`` on ``data.train`` and leave it at its best validation epoch among those that end with the
    schedule's newest masks (an epoch before the last prune of this call is a denser model than was asked for).

    Args:
        model: the network, trained in place.
        data: the splits.
        cfg: epochs, learning rate, batch, weight decay, seed of the batch order.
        schedule: a :class:`prunet.schedule.PruningSchedule` (or anything with ``step(optimizer)``):
            called at the start of every step, it prunes when its events fall due.
        log: where each epoch's line goes.

    Returns:
        One record per epoch: ``epoch``, ``lr``, ``train_bpc`` (the epoch's running mean), ``val_bpc``, ``seconds``.
    """
    if cfg.warmup_steps < 0 or cfg.epochs < 0 or cfg.lr < 0:
        raise ValueError(f"LoopConfig: epochs, lr and warmup_steps must be >= 0, got {cfg}")
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    generator = torch.Generator().manual_seed(cfg.seed)  # the batch order, on the CPU whatever the device
    device = next(model.parameters()).device
    records, best, best_state, taken = [], math.inf, None, 0
    for epoch in range(cfg.epochs):
        lr = cosine_lr(epoch, cfg.epochs, cfg.lr)
        model.train()
        start, nats, steps = time.perf_counter(), 0.0, 0
        order = torch.randperm(len(data.train), generator=generator)
        for i in range(0, len(order), cfg.batch_size):
            taken += 1
            for group in optimizer.param_groups:
                group["lr"] = lr * min(1.0, taken / cfg.warmup_steps) if cfg.warmup_steps else lr
            if schedule is not None:
                for event in schedule.step(optimizer):
                    log(f"{label} prune: {event.label}")
                    best, best_state = math.inf, None  # only epochs that end with the newest masks compete
            x, y = data.train.batch(order[i: i + cfg.batch_size])
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())  # (B·T, vocab) against (B·T,)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            nats, steps = nats + loss.item(), steps + 1
        val = bits_per_char(model, data.val)
        records.append({"epoch": epoch + 1, "lr": lr, "train_bpc": nats / steps / math.log(2), "val_bpc": val,
                        "seconds": time.perf_counter() - start})
        log(f"{label} epoch {epoch + 1}/{cfg.epochs}: lr {lr:.2e}  train {records[-1]['train_bpc']:.4f}  "
            f"val {val:.4f} bits/char  ({records[-1]['seconds']:.0f} s)")
        if val < best:
            best, best_state = val, copy.deepcopy(model.state_dict())
    if best_state is not None:
        model.load_state_dict(best_state)  # masks included: the best epoch's
    return records


# ---- the example: dense, pruned to `target` in this loop, exported, loaded back ------------------------------

def ladder(pruner: prunet.Pruner, targets: list[float], steps_per_round: int,
           quality: float | dict = 1.0) -> PruningSchedule:
    """A :class:`~prunet.schedule.PruningSchedule` pruning to each of ``targets`` in turn, one round every
    ``steps_per_round`` steps, each round the paper's rule (``quality`` × σ per layer) at its compression."""
    events = [PruneEvent(k * steps_per_round, prunet.TargetThreshold(c, quality), None, f"{c:g}x")
              for k, c in enumerate(targets)]
    return PruningSchedule(pruner, events, total_steps=len(targets) * steps_per_round)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", type=float, default=10.0, help="compression of the prunable weights")
    parser.add_argument("--chars", type=int, default=400_000)
    parser.add_argument("--dense-epochs", type=int, default=12)
    parser.add_argument("--prune-epochs", type=int, default=24)
    parser.add_argument("--out", type=Path, default=Path("runs/char_lm_own"))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = char_data(args.chars)
    print(f"corpus: {data.corpus.chars:,} characters from {len(data.corpus.files)} files of {data.corpus.root}")
    torch.manual_seed(0)
    kwargs = {"d_model": 256, "dropout": 0.1}
    model = char_gpt(**kwargs)
    train(model, data, LoopConfig(epochs=args.dense_epochs, lr=2e-3, warmup_steps=100), label="dense")
    dense = bits_per_char(model, data.test)
    pruner = prunet.Pruner(model)
    print(pruner.coverage())
    # Sparsity rises on Zhu & Gupta's cubic over the first 30% of the steps, a prune every 50; ERK's shares
    # among layers keep small ones (the output head) denser. Retraining at half the dense rate.
    cfg = LoopConfig(epochs=args.prune_epochs, lr=1e-3, seed=1)
    steps = cfg.epochs * math.ceil(len(data.train) / cfg.batch_size)
    schedule = PruningSchedule.gradual(pruner, target=args.target, start=0, end=round(0.3 * steps), every=50,
                                       criterion="erk")
    train(model, data, cfg, schedule, label="gradual")
    print(prunet.format_table(pruner.summary()))
    pruned = bits_per_char(model, data.test)
    print(f"test: dense {dense:.4f}, {pruner.compression():.1f}x {pruned:.4f} bits/char")
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": absolute("examples/char_lm.py:char_gpt"), "model_kwargs": kwargs, "input_shape": [64],
            "input_dtype": "int64"}  # one example: 64 character ids
    ckpt = prunet.save(model, args.out / "pruned.safetensors", meta)
    done = prunet.export(ckpt, args.out / "pruned.prunet", trust_factory=True)
    back = prunet.load(done.path, model=char_gpt(**kwargs))
    x, _ = data.test.batch(torch.arange(4))
    with torch.no_grad():
        same = torch.equal(back(x), model.eval()(x))
    print(f"exported {done.path} ({done.bytes:,} bytes, {done.ratio:.1f}x smaller); loaded back equal: {same}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
