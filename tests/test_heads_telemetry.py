"""Telemetry: a short Trainer run and a plain loop log every head score at exactly the requested
steps; the timeline figure builds."""

from __future__ import annotations

import json

import pytest
import torch
import transformers as tf
from factories import random_hf_model

from mechkit.heads import ALL_KINDS, TelemetryCallback, log_head_scores, read_telemetry, timeline_figure


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=24, L=16, vocab=211, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(1, vocab, (n, L), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.x[i], "attention_mask": torch.ones_like(self.x[i])}


def test_trainer_callback_logs_exact_steps(tmp_path):
    model = random_hf_model("gpt2").train()
    path = tmp_path / "telemetry.jsonl"
    cb = TelemetryCallback(every=2, path=path, steps=[1], n=2, T=6)
    args = tf.TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=5, per_device_train_batch_size=4,
                                learning_rate=1e-3, logging_strategy="no", save_strategy="no", report_to=[],
                                use_cpu=True, disable_tqdm=True, seed=0)
    tf.Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[cb]).train()
    recs = read_telemetry(path)
    assert [r["step"] for r in recs] == [1, 2, 4]
    for r in recs:
        assert list(r["scores"]) == list(ALL_KINDS)
        for v in r["scores"].values():
            assert torch.tensor(v).shape == (3, 4) and torch.isfinite(torch.tensor(v)).all()
    # training changes the weights, so the scores move between logs
    assert recs[0]["scores"]["previous_token"] != recs[-1]["scores"]["previous_token"]
    assert model.training  # the callback restores training mode
    fig = timeline_figure(path, top=2)
    assert len(fig.data) == len(ALL_KINDS) * 12 and sum(bool(d.showlegend) for d in fig.data) == 2 * len(ALL_KINDS)
    assert list(fig.data[0].x) == [1, 2, 4]


def test_plain_loop_and_scores_match_direct(tmp_path):
    import mechkit as mk
    from mechkit.heads import head_scores

    model = random_hf_model("llama").train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    path = tmp_path / "t.jsonl"
    x = torch.randint(1, 211, (4, 12), generator=torch.Generator().manual_seed(0))
    for step in range(1, 6):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step in (2, 5):
            rec = log_head_scores(model, step, path, kinds=("induction", "sink"), n=3, T=5)
    assert [r["step"] for r in read_telemetry(path)] == [2, 5]
    assert model.training  # restored after scoring in eval mode
    want = head_scores(mk.load(model), kinds=("induction", "sink"), n=3, T=5)
    for k in ("induction", "sink"):
        torch.testing.assert_close(torch.tensor(rec["scores"][k]), want[k].values)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(l) for l in lines)
    assert timeline_figure(path).layout.title.text == "head scores during training"


def test_checkpoint_folder(tmp_path):
    from mechkit.heads import telemetry_from_checkpoints

    for step, seed in [(10, 0), (2, 1)]:
        random_hf_model("gpt2", seed=seed).save_pretrained(str(tmp_path / "run" / f"checkpoint-{step}"))
    (tmp_path / "run" / "other").mkdir()
    steps = telemetry_from_checkpoints(tmp_path / "run", tmp_path / "t.jsonl", kinds=("induction",), n=2, T=5,
                                       progress=False)
    recs = read_telemetry(tmp_path / "t.jsonl")
    assert steps == [2, 10] and [r["step"] for r in recs] == [2, 10]
    assert recs[0]["scores"] != recs[1]["scores"]  # different weights, different scores
    with pytest.raises(ValueError, match="no checkpoint"):
        telemetry_from_checkpoints(tmp_path / "run" / "other", tmp_path / "u.jsonl")


def test_bad_every():
    with pytest.raises(ValueError, match="every"):
        TelemetryCallback(every=0)


def test_induction_telemetry_script(tmp_path):
    """scripts/induction_telemetry.py: one JSONL record per checkpoint in step order, and the timeline HTML."""
    from factories import load_script

    mod = load_script("induction_telemetry")
    for step, seed in [(20, 0), (5, 1), (100, 2)]:
        random_hf_model("llama", seed=seed).save_pretrained(str(tmp_path / "run" / f"checkpoint-{step}"))
    steps = mod.main([str(tmp_path / "run"), "--out", str(tmp_path / "t.jsonl"), "--kinds", "induction",
                      "previous_token", "--n", "2", "--T", "5", "--quiet"])
    recs = read_telemetry(tmp_path / "t.jsonl")
    assert steps == [5, 20, 100] and [r["step"] for r in recs] == [5, 20, 100]
    assert set(recs[0]["scores"]) == {"induction", "previous_token"}
    html = (tmp_path / "t.html").read_text()
    assert "L0H0" in html and "previous_token score" in html
