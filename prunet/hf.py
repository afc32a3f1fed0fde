"""Pruning inside a Hugging Face ``Trainer``: :class:`PrunetCallback` (``pip install 'prunet[hf]'``).

The callback wraps the model in a :class:`~prunet.Pruner` when the ``Trainer`` is built, prunes
on a :class:`~prunet.schedule.PruningSchedule` after the optimizer steps it names, adds the
compression to the ``Trainer``'s logs and can save the pruned model when training ends. The
``Trainer``'s optimizer, learning-rate scheduler, loss and loop stay its own: masks hold through
PyTorch's optimizer step hooks (:mod:`prunet.masks`), and each prune zeroes the optimizer's state
at the weights it removes.

The rule: after ``g`` optimizer steps (``state.global_step``), every prune scheduled at a step
``<= g`` has been applied, so evaluations and checkpoints at step ``g`` see them. The masks are
buffers of the model (``...c_attn.weight_prunet_mask``), so the ``Trainer``'s checkpoints hold
them and ``trainer.train(resume_from_checkpoint=...)`` restores them; the schedule continues from
the checkpoint's step.

Example (``docs/huggingface.md`` runs a complete one in ``tests/test_hf.py``):
    >>> from transformers import Trainer, TrainingArguments  # doctest: +SKIP
    >>> callback = PrunetCallback(target=10, export_to="pruned.safetensors")  # doctest: +SKIP
    >>> trainer = Trainer(model, TrainingArguments("out", max_steps=1000), train_dataset=data,
    ...                   callbacks=[callback])  # doctest: +SKIP
    >>> trainer.train()  # doctest: +SKIP
    >>> callback.pruner.compression()  # doctest: +SKIP
    10.0
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch.nn as nn

from prunet.layers import totals
from prunet.masks import baked_copy
from prunet.pruner import Pruner
from prunet.schedule import PruningSchedule
from prunet.sparse.export import save, save_compact

try:
    from transformers import TrainerCallback
except ImportError:  # prunet itself needs no transformers; the callback says what to install when built
    TrainerCallback = object  # type: ignore[assignment,misc]
    HAVE_TRANSFORMERS = False
else:
    HAVE_TRANSFORMERS = True

__all__ = ["PrunetCallback", "ScheduleFactory"]

# (pruner, the Trainer's max_steps) -> the schedule, built when training begins.
ScheduleFactory = Callable[[Pruner, int], PruningSchedule]

RECOVER = 0.25  # the share of training after the last prune of the default schedule, to recover
UPDATES = 10  # mask updates of the default schedule


class PrunetCallback(TrainerCallback):
    """Prune a model on a schedule while a Hugging Face ``Trainer`` trains it.

    Either ``target`` (gradual magnitude pruning, Zhu & Gupta, per layer, from ``start`` to ``end``)
    or ``schedule`` (any :class:`~prunet.schedule.PruningSchedule`, e.g. the paper's ladder).

    Args:
        target: the compression to reach (10: one prunable weight in ten kept).
        start: the optimizer step of the first prune.
        end: the step of the last prune; default three quarters of the ``Trainer``'s
            ``max_steps``, so the last quarter recovers.
        every: steps between mask updates; default ten updates from ``start`` to ``end``.
        schedule: instead of ``target``: called with the pruner and the ``Trainer``'s ``max_steps``
            when training begins, e.g. ``lambda pruner, steps: PruningSchedule.ladder(pruner,
            target=8, steps_per_round=steps // 5)``.
        include, exclude: what to prune, as for :class:`~prunet.Pruner` (groups ``fc``, ``conv``,
            ``attn``, ``embed``, ``all``; layer names; globs). Default: linear layers (Hugging
            Face's ``Conv1D`` included), convolutions and attention in-projections; embeddings not.
        export_to: when training ends, save the pruned model here (main process only): a
            ``*.prunet`` name gets the compact file (survivors and relative indices), any other a
            checkpoint with its masks (:func:`prunet.save`). ``prunet.load(path, model=a_fresh_model)``
            reads either back into a plain model with the pruned model's outputs.

    Attributes:
        pruner: the model's :class:`~prunet.Pruner` (once the ``Trainer`` is built).
        schedule: the :class:`~prunet.schedule.PruningSchedule` (once training begins).

    Raises:
        ImportError: transformers is not installed.
        ValueError: neither or both of ``target`` and ``schedule``; a bad ``target``, ``start``,
            ``end`` or ``every``.
    """

    def __init__(self, target: float | None = None, start: int = 0, end: int | None = None,
                 every: int | None = None, schedule: ScheduleFactory | None = None,
                 include: Iterable[str] | str | None = None, exclude: Iterable[str] | str | None = None,
                 export_to: str | Path | None = None):
        if not HAVE_TRANSFORMERS:
            raise ImportError("PrunetCallback needs transformers: pip install 'prunet[hf]'")
        if (target is None) == (schedule is None):
            raise ValueError("PrunetCallback: give target= (gradual pruning) or schedule= (your own), not "
                             f"{'both' if target is not None else 'neither'}")
        if target is not None and not (isinstance(target, (int, float)) and math.isfinite(target) and target >= 1):
            raise ValueError(f"PrunetCallback: target is a compression >= 1 (10: keep one weight in ten), got {target!r}")
        if start < 0 or (end is not None and end < start) or (every is not None and every < 1):
            raise ValueError(f"PrunetCallback: needs 0 <= start <= end and every >= 1; got start={start}, end={end}, "
                             f"every={every}")
        self.target, self.start, self.end, self.every = target, start, end, every
        self.make_schedule = schedule
        self.include, self.exclude = include, exclude
        self.export_to = None if export_to is None else Path(export_to)
        self.pruner: Pruner | None = None
        self.schedule: PruningSchedule | None = None

    # --- the Trainer's events ------------------------------------------------------------------

    def on_init_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None, **kwargs: Any) -> None:
        """Wrap the model now, before the ``Trainer`` loads a checkpoint to resume: its masks are then loaded too."""
        if model is not None:
            self.pruner = Pruner(model, include=self.include, exclude=self.exclude)

    def on_train_begin(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                       optimizer: Any = None, **kwargs: Any) -> None:
        """Say what is pruned, build the schedule, and apply the prunes due by the current step."""
        resumed = state.global_step > 0
        if self.pruner is None or self.pruner.model is not model:
            self.pruner = self._late_pruner(model, resumed)
        if state.is_world_process_zero:
            print(f"prunet: {self.pruner.coverage()}")
        self.schedule = self._build_schedule(state.max_steps)
        if resumed:  # the checkpoint's masks hold every prune due by its step: continue after them
            done = sum(e.step <= state.global_step for e in self.schedule.events)
            self.schedule.load_state_dict({"steps": state.global_step, "next": done})
        else:
            self.schedule.advance_to(0, optimizer)

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Apply the prunes due after ``state.global_step`` optimizer steps (their optimizer state zeroed)."""
        if self.schedule is not None:
            self.schedule.advance_to(state.global_step, optimizer)

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
               **kwargs: Any) -> None:
        """Add ``prunet_compression`` and ``prunet_sparsity`` to the logs and to ``state.log_history``.

        Callbacks before this one in the ``Trainer``'s list have seen the logs already: the
        ``report_to`` integrations (TensorBoard, W&B) are; put this callback first to have them
        report it (``trainer.callback_handler.callbacks.insert(0, callback)``).
        """
        if self.pruner is None or logs is None:
            return
        extra = self.metrics()
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)  # the Trainer recorded this entry just before calling on_log

    def on_train_end(self, args: Any, state: Any, control: Any, model: nn.Module | None = None,
                     **kwargs: Any) -> None:
        """Warn when the schedule was cut short; save the pruned model to ``export_to`` (:meth:`export`)."""
        done = self.schedule.state_dict()["next"] if self.schedule is not None else 0
        if self.schedule is not None and done < len(self.schedule.events):
            left = self.schedule.events[done:]
            warnings.warn(f"PrunetCallback: training stopped at step {state.global_step}, before {len(left)} "
                          f"scheduled prune(s) (the last at step {left[-1].step}): compression "
                          f"{self.pruner.compression():.2f}x, short of the schedule's", stacklevel=2)
        if self.export_to is not None and state.is_world_process_zero and self.pruner is not None:
            self.export(self.export_to)

    # --- helpers -------------------------------------------------------------------------------

    def metrics(self) -> dict[str, float]:
        """``prunet_compression`` (prunable weights / kept) and ``prunet_sparsity`` (share of them pruned)."""
        t = totals(self.pruner.summary())
        return {"prunet_compression": round(t.weights / t.kept, 4) if t.kept else math.inf,
                "prunet_sparsity": round(1 - t.kept / t.weights, 6) if t.weights else 0.0}

    def export(self, path: str | Path) -> Path:
        """Save the pruned model to ``path``: a compact file when it ends in ``.prunet``, else a checkpoint."""
        path = Path(path)
        if path.suffix == ".prunet":
            keep = {name: mask.bool() for name, mask in self.pruner.masks.items()}
            return save_compact(path, baked_copy(self.pruner.model), {}, keep=keep)
        return save(self.pruner.model, path)

    def _build_schedule(self, max_steps: int) -> PruningSchedule:
        if self.make_schedule is not None:
            schedule = self.make_schedule(self.pruner, max_steps)
            if not isinstance(schedule, PruningSchedule):
                raise TypeError(f"PrunetCallback: schedule= returned {type(schedule).__name__}, not a PruningSchedule")
        else:
            end = self.end if self.end is not None else max(self.start, round((1 - RECOVER) * max_steps))
            every = self.every if self.every is not None else max(1, (end - self.start) // UPDATES)
            schedule = PruningSchedule.gradual(self.pruner, target=self.target, start=self.start, end=end, every=every)
        last = max((e.step for e in schedule.events), default=0)
        if last > max_steps:
            warnings.warn(f"PrunetCallback: the schedule's last prune is at step {last}, after the Trainer's "
                          f"max_steps {max_steps}: the target will not be reached", stacklevel=3)
        return schedule

    def _late_pruner(self, model: nn.Module, resumed: bool) -> Pruner:
        """The pruner of a callback added after the ``Trainer`` was built (``trainer.add_callback``).

        A checkpoint loaded before it existed had its masks dropped as unknown keys, but its pruned
        weights are exactly zero: on a resume, the masks are rebuilt from those zeros.
        """
        if not resumed:
            return Pruner(model, include=self.include, exclude=self.exclude)
        warnings.warn("PrunetCallback was added after the Trainer was built, so the checkpoint's masks were not "
                      "loaded: rebuilt from its zero weights (pass it as Trainer(callbacks=[...]) to load them)",
                      stacklevel=3)
        return Pruner.from_zeros(model, include=self.include, exclude=self.exclude)
