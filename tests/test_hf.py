"""prunet.hf: pruning inside a Hugging Face Trainer, on tiny BERT and GPT-2 models built from configs.

No downloads: models come from configs, inputs from torch. Each Trainer runs about ten
optimizer steps on the CPU.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # the Trainer needs it

import prunet  # noqa: E402
from prunet.hf import PrunetCallback  # noqa: E402
from prunet.schedule import PruningSchedule  # noqa: E402

DOC = Path(__file__).resolve().parent.parent / "docs" / "huggingface.md"
VOCAB, LENGTH = 64, 8


def tiny_bert() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=LENGTH, num_labels=2)
    return transformers.BertForSequenceClassification(config)


def tiny_gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=LENGTH, n_embd=32, n_layer=2, n_head=2,
                                     bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config)


def classification_data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=g)
    labels = (ids[:, 0] < VOCAB // 2).long()  # learnable: the first token says the class
    return [{"input_ids": i, "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": y}
            for i, y in zip(ids, labels)]


def language_data(n: int = 32) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, VOCAB, (n, LENGTH), generator=torch.Generator().manual_seed(2))
    return [{"input_ids": i, "labels": i} for i in ids]


def trainer_for(model, data, callback, out: Path, max_steps: int = 10, **kwargs):
    """A Trainer of ``max_steps`` small steps on the CPU, no reports; ``callback`` None: none of prunet's."""
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=1e-3,
        logging_steps=5, report_to="none", use_cpu=True, save_strategy=kwargs.pop("save_strategy", "no"),
        disable_tqdm=True, seed=0, dataloader_num_workers=0, **kwargs)
    return transformers.Trainer(model=model, args=args, train_dataset=data,
                                callbacks=[callback] if callback else None)


def test_bert_reaches_the_target_with_masks_exact_and_optimizer_state_clean(tmp_path, capsys):
    model = tiny_bert()
    callback = PrunetCallback(target=4, start=0, end=6, every=2)
    trainer = trainer_for(model, classification_data(), callback, tmp_path)
    trainer.train()

    assert "prunet: prunes" in capsys.readouterr().out  # the coverage line
    assert callback.pruner.compression() == pytest.approx(4, rel=0.01)
    assert [e.step for e in callback.schedule.events] == [0, 2, 4, 6]
    layers = {row.layer for row in callback.pruner.summary()}
    assert "bert.encoder.layer.0.attention.self.query" in layers and "classifier" in layers
    state = trainer.optimizer.state
    params = dict(model.named_parameters())
    for name, mask in callback.pruner.masks.items():
        pruned = mask == 0
        assert pruned.any(), name
        assert torch.all(params[name][pruned] == 0), name  # exactly zero after 10 steps of AdamW
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.all(state[params[name]][key][pruned] == 0), (name, key)
    logged = [entry for entry in trainer.state.log_history if "prunet_compression" in entry]
    assert logged and logged[-1]["prunet_compression"] == pytest.approx(4, rel=0.01)
    assert logged[-1]["prunet_sparsity"] == pytest.approx(0.75, abs=0.01)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.randint(0, VOCAB, (3, LENGTH))).logits
    assert logits.shape == (3, 2) and torch.isfinite(logits).all()


@pytest.mark.parametrize("suffix", [".safetensors", ".prunet"])  # a checkpoint with masks, the compact file
def test_gpt2_conv1d_layers_are_pruned_and_the_export_gives_the_same_outputs(tmp_path, suffix):
    model = tiny_gpt2()
    export = tmp_path / f"gpt2{suffix}"
    callback = PrunetCallback(target=5, end=8, every=2, export_to=export)
    trainer_for(model, language_data(), callback, tmp_path / "out").train()

    layers = {row.layer: row for row in callback.pruner.summary()}
    for name in ("transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.1.mlp.c_fc",
                 "transformer.h.1.mlp.c_proj"):
        assert layers[name].kept < layers[name].weights, name
    assert not any("wte" in name or "lm_head" in name for name in layers)  # embeddings (tied to lm_head) are opt-in
    assert callback.pruner.compression() == pytest.approx(5, rel=0.01)
    back = prunet.load(export, model=tiny_gpt2())
    ids = torch.randint(0, VOCAB, (2, LENGTH))
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert back.transformer.h[0].attn.c_attn.weight.eq(0).float().mean() > 0.75  # the zeros came back


def test_a_ladder_schedule_and_include_globs(tmp_path):
    model = tiny_bert()
    callback = PrunetCallback(schedule=lambda pruner, steps: PruningSchedule.ladder(pruner, target=3,
                                                                                      steps_per_round=steps // 5),
                              include=["bert.encoder.*"])
    trainer_for(model, classification_data(), callback, tmp_path).train()

    layers = [row.layer for row in callback.pruner.summary()]
    assert layers and all(name.startswith("bert.encoder.") for name in layers)
    assert callback.pruner.compression() == pytest.approx(3, rel=0.05)


class MasksAtStart(transformers.TrainerCallback):
    """Records the model's masks when training begins (after the checkpoint to resume from is loaded)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.masks = {k: v.clone() for k, v in model.state_dict().items() if k.endswith("_prunet_mask")}


def run_to_resume(out: Path, resume: str | None = None, late: bool = False):
    """Ten steps of tiny BERT pruned to 4x by step 8, a checkpoint every 5 steps; the masks when training began."""
    model, callback, start = tiny_bert(), PrunetCallback(target=4, end=8, every=2), MasksAtStart()
    trainer = trainer_for(model, classification_data(), None if late else callback, out,
                          save_strategy="steps", save_steps=5)
    if late:
        trainer.add_callback(callback)  # after the Trainer was built
    trainer.add_callback(start)  # after the PrunetCallback: sees the masks it starts from
    trainer.train(resume_from_checkpoint=resume)
    return model, callback, start.masks


def checkpoint_masks(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v.bool() for k, v in load_file(str(checkpoint / "model.safetensors")).items()
            if k.endswith("_prunet_mask")}


def test_resuming_from_a_checkpoint_keeps_the_masks(tmp_path, recwarn):
    whole, _, _ = run_to_resume(tmp_path / "out")
    checkpoint = tmp_path / "out" / "checkpoint-5"
    saved = checkpoint_masks(checkpoint)
    assert len(saved) == 14  # 2 layers x 6 linear layers, the pooler and the classifier
    assert 1.5 < sum(m.numel() for m in saved.values()) / sum(int(m.sum()) for m in saved.values()) < 4
    resumed, callback, at_start = run_to_resume(tmp_path / "out", resume=str(checkpoint))
    assert sorted(at_start) == sorted(saved)
    for name, mask in saved.items():
        assert torch.equal(at_start[name].bool(), mask), name  # loaded with the weights...
    assert not [w for w in recwarn if "rebuilt" in str(w.message)]  # ...as buffers, not rebuilt from zeros
    for name, mask in whole.state_dict().items():
        if name.endswith("_prunet_mask"):
            assert torch.equal(resumed.state_dict()[name], mask), name  # the prunes after step 5, applied once
    assert callback.pruner.compression() == pytest.approx(4, rel=0.01)


def test_a_callback_added_late_rebuilds_the_masks_from_zeros_on_resume(tmp_path):
    run_to_resume(tmp_path / "out")
    checkpoint = tmp_path / "out" / "checkpoint-5"
    with pytest.warns(UserWarning, match="rebuilt from its zero weights"):
        _, callback, at_start = run_to_resume(tmp_path / "out", resume=str(checkpoint), late=True)
    for name, mask in checkpoint_masks(checkpoint).items():
        assert torch.equal(at_start[name].bool(), mask), name
    assert callback.pruner.compression() == pytest.approx(4, rel=0.01)


def test_errors_are_clear():
    with pytest.raises(ValueError, match="target= .* or schedule= .*not neither"):
        PrunetCallback()
    with pytest.raises(ValueError, match="not both"):
        PrunetCallback(target=4, schedule=lambda pruner, steps: PruningSchedule.gradual(pruner, 4, 0, 1))
    with pytest.raises(ValueError, match="target is a compression >= 1"):
        PrunetCallback(target=0.5)
    with pytest.raises(ValueError, match="start <= end"):
        PrunetCallback(target=4, start=5, end=2)


def test_a_schedule_longer_than_training_warns(tmp_path):
    callback = PrunetCallback(target=4, start=0, end=50, every=10)
    trainer = trainer_for(tiny_bert(), classification_data(), callback, tmp_path, max_steps=4)
    with pytest.warns(UserWarning) as caught:
        trainer.train()
    messages = [str(w.message) for w in caught]
    assert any("the schedule's last prune is at step 50, after the Trainer's max_steps 4" in m for m in messages)
    assert any("training stopped at step 4, before 5 scheduled prune(s)" in m for m in messages)


def test_the_documented_example_runs(tmp_path, monkeypatch):
    """docs/huggingface.md's example, run as it is written (in a fresh folder)."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)
    assert blocks, f"no python example in {DOC}"
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exec(compile(blocks[0], str(DOC), "exec"), {"__name__": "__doc_example__"})
    assert (tmp_path / "pruned.safetensors").is_file()
