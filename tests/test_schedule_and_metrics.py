"""Pure functions: the learning-rate schedule and the metrics, checked without a model."""

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from vitfood.evaluation import summarize, topk_correct, update_confusion
from vitfood.optim import lr_at, warmup_steps_for


def test_warmup_steps_round_up_like_the_trainer():
    assert warmup_steps_for(237, 0.1) == 24
    assert warmup_steps_for(10, 0.0) == 0


@pytest.mark.parametrize("total, warmup", [(20, 2), (7, 0), (5, 5), (237, 24)])
def test_schedule_equals_transformers(total, warmup):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=5e-5)
    sched = get_linear_schedule_with_warmup(opt, warmup, total)
    for step in range(total):
        assert lr_at(step, 5e-5, warmup, total) == pytest.approx(opt.param_groups[0]["lr"], abs=1e-15)
        opt.step()
        sched.step()


def test_schedule_values():
    # 10 steps, 2 of warmup: 0, half, full, then down by 1/8 of the peak per step.
    assert [lr_at(s, 1.0, 2, 10) for s in range(10)] == [0.0, 0.5, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]


def test_metrics_from_confusion():
    logits = torch.tensor([[5.0, 1, 0], [0, 5, 1], [0, 1, 5], [5, 0, 1], [0, 4, 5]])
    labels = torch.tensor([0, 1, 2, 1, 1])
    confusion = torch.zeros(3, 3, dtype=torch.int64)
    update_confusion(confusion, logits, labels)
    assert confusion.tolist() == [[1, 0, 0], [1, 1, 1], [0, 0, 1]]
    assert topk_correct(logits, labels, 2).item() == 4  # row 3 has label 1 third
    out = summarize(confusion, loss_sum=2.5, top5_correct=5, label_names=["a", "b", "c"])
    assert out["eval_accuracy"] == pytest.approx(3 / 5)
    assert out["eval_loss"] == pytest.approx(0.5)
    assert out["per_class_accuracy"] == pytest.approx({"a": 1.0, "b": 1 / 3, "c": 1.0})
    with pytest.raises(ValueError):
        summarize(torch.zeros(3, 3, dtype=torch.int64), 0.0, 0, ["a", "b", "c"])
