"""Hinton KD against an independent float64 computation, value and gradient."""

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from kd_cli.errors import KdError
from kd_cli.losses import build_loss
from kd_cli.losses.hinton import CrossEntropy, HintonKD

STUDENT = np.array([[2.0, -1.0, 0.5, 0.0], [0.1, 0.2, 3.0, -2.0], [-1.0, 1.0, 0.0, 2.5]])
TEACHER = np.array([[4.0, -2.0, 1.0, 0.0], [0.0, 1.0, 5.0, -1.0], [-2.0, 0.5, 0.5, 3.0]])
TARGETS = np.array([0, 2, 3])


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def reference(alpha, T):
    """(1-a)*CE + a*T^2*KL(p_t || p_s), KL summed over classes and averaged over the batch."""
    n = len(TARGETS)
    ce = -np.mean(np.log(softmax(STUDENT)[np.arange(n), TARGETS]))
    p_t, p_s = softmax(TEACHER / T), softmax(STUDENT / T)
    kl = np.sum(p_t * (np.log(p_t) - np.log(p_s))) / n
    value = (1 - alpha) * ce + alpha * T * T * kl
    onehot = np.eye(4)[TARGETS]
    grad = (1 - alpha) * (softmax(STUDENT) - onehot) / n + alpha * T * (p_s - p_t) / n
    return value, grad


@pytest.mark.parametrize("alpha, T", [(0.6, 4.0), (0.25, 2.0), (0.0, 1.0), (1.0, 8.0), (0.9, 0.5)])
def test_kd_value_and_gradient(alpha, T):
    student = torch.tensor(STUDENT, requires_grad=True)
    teacher = torch.tensor(TEACHER, requires_grad=True)
    loss = HintonKD(alpha=alpha, T=T)({"logits": student}, {"logits": teacher.detach()}, torch.tensor(TARGETS))
    loss.backward()
    want_value, want_grad = reference(alpha, T)
    assert loss.item() == pytest.approx(want_value, rel=1e-10)
    np.testing.assert_allclose(student.grad.numpy(), want_grad, rtol=1e-9, atol=1e-12)
    assert teacher.grad is None  # the teacher never receives a gradient


def test_kd_of_identical_logits_is_only_the_label_term():
    logits = torch.tensor(STUDENT)
    targets = torch.tensor(TARGETS)
    kd = HintonKD(alpha=0.5, T=3.0)({"logits": logits}, {"logits": logits}, targets)
    ce = CrossEntropy()({"logits": logits}, None, targets)
    assert kd.item() == pytest.approx(0.5 * ce.item(), rel=1e-12)


def test_kd_uses_batchmean_not_elementwise_mean():
    """`mean` reduction would be smaller by the number of classes: a common bug in KD code."""
    alpha, T = 1.0, 2.0
    loss = HintonKD(alpha=alpha, T=T)({"logits": torch.tensor(STUDENT)}, {"logits": torch.tensor(TEACHER)}, torch.tensor(TARGETS))
    want, _ = reference(alpha, T)
    assert not math.isclose(loss.item(), want / 4)
    assert loss.item() == pytest.approx(want)


def test_ce_needs_no_teacher():
    assert CrossEntropy.needs_teacher is False and HintonKD.needs_teacher is True


def test_build_loss_reads_top_level_alpha_and_T():
    loss = build_loss(OmegaConf.create({"loss": {"name": "kd"}, "alpha": 0.3, "T": 5}))
    assert (loss.alpha, loss.T) == (0.3, 5.0)


def test_unknown_loss_lists_the_valid_ones():
    with pytest.raises(KdError, match="unknown loss 'nope'; choose one of: at, cc, ce, combo, cosine, crd, dist, dkd, "):
        build_loss(OmegaConf.create({"loss": {"name": "nope"}, "alpha": 0.5, "T": 2}))
