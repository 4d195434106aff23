"""The training recipe end to end on a tiny random Llama: learning, adapters, resume, config."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")


from fairdistill.engine.errors import ConfigError  # noqa: E402
from fairdistill.trainer import data as D  # noqa: E402
from fairdistill.trainer.model import load_student, save_tiny_student  # noqa: E402
from fairdistill.trainer.train import TrainConfig, get_lr, load_config, train  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> str:
    """A randomly initialised 2-layer Llama with the real SmolLM2 tokenizer, saved as a folder."""
    return save_tiny_student(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    return str(D.write_run_dir(tmp_path_factory.mktemp("run"), D.synthetic_samples(12, seed=0)))


def config(tiny_model: str, run_dir: str, out: Path, **kw) -> TrainConfig:
    defaults = dict(
        inputs=[run_dir],
        out=str(out),
        model=tiny_model,
        batch_size=4,
        max_seq_len=256,
        lr=5e-3,
        lora_rank=8,
        lora_dropout=0.1,
        progress=False,
        eval_every=0,
        save_every=0,
    )
    return TrainConfig(**{**defaults, **kw})


def rows(out: Path, split: str = "train") -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def test_lora_steps_reduce_the_loss_and_write_outputs(tiny_model, run_dir, tmp_path):
    cfg = config(tiny_model, run_dir, tmp_path, max_steps=12, schedule="constant", val_fraction=0.2, lr=1e-2)
    summary = train(cfg)
    # the plain token mean: the α-weighted loss also moves with each step's task mix
    losses = [r["loss_tokens"] for r in rows(tmp_path)]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3  # from ln(49152) = 10.8 at random init
    assert summary["steps"] == 12 and summary["val_examples"] > 0
    for name in (
        "adapter/adapter_config.json",
        "best/adapter_config.json",
        "checkpoint/state.pt",
        "loss.png",
    ):
        assert (tmp_path / name).exists(), name
    assert rows(tmp_path, "val")[-1]["val_loss_mistake"] is not None


def test_saved_adapter_reloads_with_identical_logits(tiny_model, tmp_path):
    from peft import LoraConfig, get_peft_model

    model, _ = load_student(tiny_model)
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():  # LoRA B starts at zero: make the adapter actually change the output
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    model.eval()
    ids = torch.randint(0, 1000, (2, 17))
    before = model(ids).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded, _ = load_student(tiny_model, adapter=tmp_path / "adapter")
    after = reloaded.eval()(ids).logits
    base, _ = load_student(tiny_model)
    assert torch.equal(before, after)
    assert not torch.allclose(base.eval()(ids).logits, after)


def test_resume_after_interrupt_continues_from_the_saved_step(tiny_model, run_dir, tmp_path):
    """A kill at step 5 (last checkpoint at step 4) then --resume reproduces the uninterrupted run,
    dropout and cosine schedule included."""
    full = tmp_path / "full"
    train(config(tiny_model, run_dir, full, max_steps=6, val_fraction=0.0))

    class Killed(Exception):
        pass

    def kill_at_5(step: int, row: dict) -> None:
        if step == 5:
            raise Killed

    cut = tmp_path / "cut"
    with pytest.raises(Killed):
        train(
            config(tiny_model, run_dir, cut, max_steps=6, val_fraction=0.0, save_every=2), on_step=kill_at_5
        )
    seen = []
    train(
        config(tiny_model, run_dir, cut, max_steps=6, val_fraction=0.0, save_every=2, resume=True),
        on_step=lambda step, row: seen.append(step),
    )
    assert seen == [5, 6]  # continued from the step-4 checkpoint
    a, b = rows(full), rows(cut)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # the pre-kill step 5 row was dropped
    for ra, rb in zip(a, b, strict=True):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5)
        assert ra["lr"] == pytest.approx(rb["lr"])


def test_existing_checkpoint_needs_resume(tiny_model, run_dir, tmp_path):
    train(config(tiny_model, run_dir, tmp_path, max_steps=1, val_fraction=0.0))
    with pytest.raises(ConfigError, match="--resume"):
        train(config(tiny_model, run_dir, tmp_path, max_steps=2, val_fraction=0.0))


def test_full_finetune_and_padded_batches(tiny_model, run_dir, tmp_path):
    summary = train(
        config(
            tiny_model, run_dir, tmp_path, max_steps=3, finetune="full", packing=False, lr=1e-3, grad_accum=2
        )
    )
    assert summary["trainable_params"] > 3_000_000  # embeddings included
    model, _ = load_student(summary["model"])
    assert model.config.num_hidden_layers == 2


def test_toml_config_maps_onto_train_config(tmp_path):
    path = tmp_path / "train.toml"
    path.write_text('inputs = ["runs/a"]\nalpha = 0.7\nlora_target_modules = ["q_proj", "v_proj"]\n')
    cfg = load_config(path)
    assert cfg.alpha == 0.7 and cfg.lora_target_modules == ["q_proj", "v_proj"]
    path.write_text("alpha = 1.5\n")
    with pytest.raises(ConfigError, match="alpha"):
        load_config(path)
    path.write_text("alhpa = 0.5\n")
    with pytest.raises(ConfigError, match="alhpa"):
        load_config(path)


def test_cosine_schedule_warms_up_then_decays():
    lrs = [get_lr(s, 100, 10, "cosine", 0.1) for s in range(101)]
    assert lrs[0] < lrs[5] < lrs[10] == 1.0
    assert lrs[100] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert get_lr(50, 100, 10, "constant", 0.1) == 1.0


@pytest.mark.slow
def test_real_smollm2_trains_and_reloads(tmp_path):
    """The default 135M student: one LoRA step on a mixed batch, then the adapter loads."""
    run = D.write_run_dir(tmp_path / "run", D.synthetic_samples(1, seed=3))
    cfg = TrainConfig(
        inputs=[str(run)],
        out=str(tmp_path / "out"),
        max_steps=1,
        batch_size=2,
        max_seq_len=256,
        val_fraction=0.0,
        progress=False,
    )
    summary = train(cfg)
    # the reference: the base model's own FAIR loss on the same batch (LoRA B starts at 0, so
    # step 1 sees exactly the base model); the trained adapter must do better on that batch
    from fairdistill.trainer.loss import fair_loss
    from fairdistill.trainer.model import load_tokenizer

    tok = load_tokenizer(None)
    ex, _ = D.tokenize(D.load_samples([run]), tok, 256)
    batch = D.collate(ex, packing=False, pad_id=tok.pad_token_id or 0)
    base, _ = load_student()
    with torch.no_grad():
        reference = float(fair_loss(base.eval(), batch, 0.5))
    assert summary["loss"] == pytest.approx(reference, rel=1e-3)
    model, _ = load_student(adapter=summary["adapter"])
    assert model.peft_config["default"].r == 16
    with torch.no_grad():
        assert float(fair_loss(model.eval(), batch, 0.5)) < reference


def test_paired_batching_gives_every_step_a_full_batch_of_each_task(tiny_model, run_dir, tmp_path):
    """The paper's layout: each step one rationale batch and one mistake batch (two passes)."""
    summary = train(config(tiny_model, run_dir, tmp_path, max_steps=4, val_fraction=0.0, batching="paired"))
    assert summary["batching"] == "paired"
    for r in rows(tmp_path):
        assert r["tokens_mistake"] > 0 and r["tokens_rationale"] > 0
        assert r["loss"] == pytest.approx(0.5 * r["loss_mistake"] + 0.5 * r["loss_rationale"])
    # the units themselves: 12 problems -> 12 rationale + 12 mistake examples -> 3 pairs of 4
    ex = [D.Example(f"e{i}", f"p{i // 2}", i % 2, [1, 2], [2, -100]) for i in range(24)]
    units = D.step_units(ex, 4, seed=0, epoch=0, batching="paired")
    assert len(units) == D.units_per_epoch(ex, 4, "paired") == 3
    for rat, mis in units:
        assert [e.task for e in rat] == [0] * 4 and [e.task for e in mis] == [1] * 4
    assert sorted(e.id for u in units for g in u for e in g) == sorted(e.id for e in ex)  # each once
    mixed = D.step_units(ex, 4, seed=0, epoch=0, batching="mixed")
    assert len(mixed) == 6 and all(len(u) == 1 for u in mixed)


def test_trained_folders_record_their_runs_and_problem_ids(tiny_model, run_dir, tmp_path):
    from fairdistill.engine.fair.splits import find_training_record, ids_digest

    train(config(tiny_model, run_dir, tmp_path, max_steps=1, val_fraction=0.2))
    trained = sorted({s.problem_id for s in D.load_samples([run_dir])})
    for folder in (tmp_path, tmp_path / "adapter", tmp_path / "best"):
        record = find_training_record(folder)
        assert record is not None, folder
        assert record["problem_ids"] == trained  # validation problems too: the student saw them
        assert record["problem_ids_sha256"] == ids_digest(trained)
        assert record["runs"][0]["run_dir"] == str(Path(run_dir).resolve())
