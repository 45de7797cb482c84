"""Every method of the library against an independent float64 NumPy computation, plus the properties
the math promises: gradients reach the student and its helpers and never the teacher, zero loss
where the student's outputs equal the teacher's, one-line errors for pairings that cannot work."""

import inspect
import logging
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from kd_cli.errors import KdError
from kd_cli.features import FeatureTaps
from kd_cli.losses import LOSSES, DistillationLoss, build_loss
from kd_cli.losses.combo import Combo
from kd_cli.losses.hinton import HintonKD
from kd_cli.losses.weighted import WeightedTerm
from kd_cli.models import ImageSpec, build_model

REPO = Path(__file__).resolve().parent.parent
RNG = np.random.RandomState(7)
B, K = 5, 4
S_LOGITS = RNG.randn(B, K) * 2
T_LOGITS = RNG.randn(B, K) * 3
TARGETS = np.array([0, 3, 1, 2, 3])
ALPHA, TEMP = 0.3, 3.0


# ---------------------------------------------------------------- NumPy references (float64)

def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def cross_entropy(z, y):
    return -np.mean(np.log(softmax(z)[np.arange(len(y)), y]))


def mixed(term, z=S_LOGITS, y=TARGETS, alpha=ALPHA, weight=1.0):
    """kd's convention for every method: (1 - alpha) * CE + alpha * weight * term."""
    return (1 - alpha) * cross_entropy(z, y) + alpha * weight * term


def ref_kl(p, q):
    return np.sum(p * np.log(p / q)) / len(p)


def ref_logits_mse(s, t):
    return 0.5 * np.mean(np.sum((s - t) ** 2, axis=1))


def ref_soft_ce(s, t, T):
    return T * T * np.mean(-np.sum(softmax(t / T) * np.log(softmax(s / T)), axis=1))


def ref_dkd_parts(s, t, y, T):
    tckd, nckd = [], []
    for i in range(len(y)):
        p, q = softmax(s[i:i + 1] / T)[0], softmax(t[i:i + 1] / T)[0]
        bp, bq = np.array([p[y[i]], 1 - p[y[i]]]), np.array([q[y[i]], 1 - q[y[i]]])
        tckd.append(np.sum(bq * np.log(bq / bp)))
        others = [k for k in range(len(p)) if k != y[i]]
        p_hat, q_hat = p[others] / p[others].sum(), q[others] / q[others].sum()
        nckd.append(np.sum(q_hat * np.log(q_hat / p_hat)))
    return np.array(tckd), np.array(nckd)


def ref_dist(s, t, T, beta, gamma):
    ps, pt = softmax(s / T), softmax(t / T)
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(len(ps))])
    intra = 1 - np.mean([np.corrcoef(ps[:, j], pt[:, j])[0, 1] for j in range(ps.shape[1])])
    return T * T * (beta * inter + gamma * intra)


def ref_tf_kd(s, y, T, a):
    k = s.shape[1]
    virtual = np.full((len(y), k), (1 - a) / (k - 1))
    virtual[np.arange(len(y)), y] = a
    soft = virtual ** (1 / T)  # softening a distribution = raising it to 1/T and renormalising
    soft /= soft.sum(axis=1, keepdims=True)
    return T * T * ref_kl(soft, softmax(s / T))


def ref_conv(x, w, bias, padding=0):
    """Cross-correlation as a plain sum (what nn.Conv2d computes)."""
    x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    n, _, h, wd = x.shape
    o, _, kh, kw = w.shape
    out = np.zeros((n, o, h - kh + 1, wd - kw + 1))
    for i in range(out.shape[2]):
        for j in range(out.shape[3]):
            patch = x[:, :, i:i + kh, j:j + kw]
            out[:, :, i, j] = np.einsum("nchw,ochw->no", patch, w) + bias
    return out


def block_mean(x, size):
    """Average-pool (N, C, H, W) to (size, size) when H is a multiple of size."""
    n, c, h, w = x.shape
    return x.reshape(n, c, size, h // size, size, w // size).mean(axis=(3, 5))


def ref_at_pair(s, t, p=2):
    size = min(s.shape[2], t.shape[2])
    s, t = block_mean(s, size), block_mean(t, size)

    def att(f):
        a = (np.abs(f) ** p).mean(axis=1).reshape(len(f), -1)
        return a / np.linalg.norm(a, axis=1, keepdims=True)

    return np.mean((att(s) - att(t)) ** 2)


def ref_nst_pair(s, t):
    total = 0.0
    for i in range(len(s)):
        fs = s[i].reshape(s.shape[1], -1)
        ft = t[i].reshape(t.shape[1], -1)
        fs = fs / np.linalg.norm(fs, axis=1, keepdims=True)
        ft = ft / np.linalg.norm(ft, axis=1, keepdims=True)
        k = lambda a, b: np.mean([(u @ v) ** 2 for u in a for v in b])  # noqa: E731
        total += k(ft, ft) + k(fs, fs) - 2 * k(fs, ft)
    return total / len(s)


def ref_fsp(maps_s, maps_t):
    def g(a, b):
        return np.einsum("nihw,njhw->nij", a, b) / (a.shape[2] * a.shape[3])

    return sum(np.mean((g(maps_s[i], maps_s[i + 1]) - g(maps_t[i], maps_t[i + 1])) ** 2) for i in range(len(maps_s) - 1))


def huber(x):
    return np.where(np.abs(x) < 1, 0.5 * x * x, np.abs(x) - 0.5)


def ref_rkd(s, t, wd=25.0, wa=50.0):
    n = len(s)

    def dist(e):
        d = np.array([[np.linalg.norm(e[i] - e[j]) for j in range(n)] for i in range(n)])
        return d / (d.sum() / (n * (n - 1)))

    def ang(e):
        out = np.zeros((n, n, n))
        for i in range(n):
            for j in range(n):
                for k in range(n):
                    u, v = e[j] - e[i], e[k] - e[i]
                    nu, nv = np.linalg.norm(u), np.linalg.norm(v)
                    out[i, j, k] = 0.0 if nu == 0 or nv == 0 else u @ v / (nu * nv)
        return out

    return wd * np.mean(huber(dist(s) - dist(t))) + wa * np.mean(huber(ang(s) - ang(t)))


def ref_sp(s, t):
    def g(f):
        f = f.reshape(len(f), -1)
        m = f @ f.T
        return m / np.linalg.norm(m, axis=1, keepdims=True)

    return np.sum((g(s) - g(t)) ** 2) / len(s) ** 2


def ref_pkt(s, t, eps=1e-7):
    def cond(f):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        m = (f @ f.T + 1) / 2
        return m / m.sum(axis=1, keepdims=True)

    ps, pt = cond(s), cond(t)
    return np.mean(pt * np.log((pt + eps) / (ps + eps)))


def ref_cc(s, t, gamma=0.4, order=2):
    def corr(f):
        f = f / np.linalg.norm(f, axis=1, keepdims=True)
        c = f @ f.T
        return np.exp(-2 * gamma) * sum((2 * gamma * c) ** p / math.factorial(p) for p in range(order + 1))

    return np.mean((corr(s) - corr(t)) ** 2)


# ---------------------------------------------------------------- helpers

def make(name, alpha=ALPHA, T=TEMP, **options):
    return LOSSES[name](alpha=alpha, T=T, **options)


def with_layers(loss, student_shapes, teacher_shapes, num_train=50):
    """Give a loss layer names and build its helpers for the shapes, as attach() would."""
    loss.student_layers = [f"s{i}" for i in range(len(student_shapes))]
    loss.teacher_layers = [f"t{i}" for i in range(len(teacher_shapes))]
    loss.setup([tuple(s) for s in student_shapes], [tuple(t) for t in teacher_shapes], num_train)
    return loss


def outputs(loss, student_feats, teacher_feats, s_logits=S_LOGITS, t_logits=T_LOGITS):
    student = {"logits": torch.tensor(s_logits)}
    teacher = {"logits": torch.tensor(t_logits)}
    student.update({k: torch.tensor(v) for k, v in zip(loss.student_layers, student_feats)})
    teacher.update({k: torch.tensor(v) for k, v in zip(loss.teacher_layers, teacher_feats)})
    return student, teacher


def value(loss, student, teacher, targets=TARGETS, indices=None):
    return loss(student, teacher, torch.tensor(targets), indices=indices).item()


def feats(*shape):
    return RNG.randn(*shape)


def numeric_grad(f, x, h=1e-6):
    grad = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (f(up) - f(down)) / (2 * h)
    return grad


def autograd_of_term(loss, student_feats, teacher_feats, which, s_logits=S_LOGITS):
    """Gradient of loss.term() with respect to the student's feature `which` (or "logits")."""
    student, teacher = outputs(loss, student_feats, teacher_feats, s_logits=s_logits)
    key = "logits" if which == "logits" else loss.student_layers[which]
    student[key].requires_grad_(True)
    loss.term(student, teacher, torch.tensor(TARGETS)).backward()
    return student[key].grad.numpy()


# ---------------------------------------------------------------- response-based

def test_logits_mse_value_and_gradient():
    loss = make("logits_mse", weight=2.0)
    student, teacher = outputs(loss, [], [])
    assert value(loss, student, teacher) == pytest.approx(mixed(ref_logits_mse(S_LOGITS, T_LOGITS), weight=2.0), rel=1e-12)
    want = numeric_grad(lambda s: ref_logits_mse(s, T_LOGITS), S_LOGITS)
    np.testing.assert_allclose(autograd_of_term(loss, [], [], "logits"), want, rtol=1e-6, atol=1e-9)


def test_soft_ce_is_kd_plus_the_teacher_entropy():
    loss = make("soft_ce")
    student, teacher = outputs(loss, [], [])
    assert value(loss, student, teacher) == pytest.approx(mixed(ref_soft_ce(S_LOGITS, T_LOGITS, TEMP)), rel=1e-12)
    kd = HintonKD(alpha=ALPHA, T=TEMP)(student, teacher, torch.tensor(TARGETS)).item()
    p_t = softmax(T_LOGITS / TEMP)
    entropy = -np.mean(np.sum(p_t * np.log(p_t), axis=1))
    assert value(loss, student, teacher) - kd == pytest.approx(ALPHA * TEMP**2 * entropy, rel=1e-10)
    # Same gradients as kd: the entropy does not depend on the student.
    want = numeric_grad(lambda s: TEMP**2 * ref_kl(softmax(T_LOGITS / TEMP), softmax(s / TEMP)), S_LOGITS)
    np.testing.assert_allclose(autograd_of_term(loss, [], [], "logits"), want, rtol=1e-6, atol=1e-9)


def test_dkd_value_gradient_and_the_kd_decomposition():
    loss = make("dkd", tckd_weight=1.5, nckd_weight=8.0)
    student, teacher = outputs(loss, [], [])
    tckd, nckd = ref_dkd_parts(S_LOGITS, T_LOGITS, TARGETS, TEMP)
    term = TEMP**2 * (1.5 * tckd.mean() + 8.0 * nckd.mean())
    assert value(loss, student, teacher) == pytest.approx(mixed(term), rel=1e-10)
    # KL(p_t || p_s) = TCKD + (1 - p_t[target]) * NCKD for every sample (Zhao et al., eq. 2).
    p_t = softmax(T_LOGITS / TEMP)[np.arange(B), TARGETS]
    per_sample_kl = [np.sum(q * np.log(q / p)) for p, q in zip(softmax(S_LOGITS / TEMP), softmax(T_LOGITS / TEMP))]
    np.testing.assert_allclose(tckd + (1 - p_t) * nckd, per_sample_kl, rtol=1e-10)

    def ref(s):
        a, b = ref_dkd_parts(s, T_LOGITS, TARGETS, TEMP)
        return TEMP**2 * (1.5 * a.mean() + 8.0 * b.mean())

    np.testing.assert_allclose(autograd_of_term(loss, [], [], "logits"), numeric_grad(ref, S_LOGITS), rtol=1e-5, atol=1e-8)


def test_dkd_warms_up_linearly():
    loss = make("dkd", warmup_epochs=20)
    student, teacher = outputs(loss, [], [])
    full = loss.term(student, teacher, torch.tensor(TARGETS)).item()
    loss.set_epoch(5)
    assert loss.term(student, teacher, torch.tensor(TARGETS)).item() == pytest.approx(full * 5 / 20, rel=1e-12)
    loss.set_epoch(40)
    assert loss.term(student, teacher, torch.tensor(TARGETS)).item() == pytest.approx(full, rel=1e-12)


@pytest.mark.parametrize("loss", [make("dkd", warmup_epochs=20), make("combo", terms={"dkd": {"warmup_epochs": 20}})],
                         ids=["dkd", "combo"])
def test_dkd_warns_when_the_run_ends_inside_its_warm_up(loss, caplog):
    with caplog.at_level(logging.WARNING, logger="kd_cli.losses.response"):
        loss.check_epochs(20)
        assert not caplog.records
        loss.check_epochs(5)
    assert [r.getMessage() for r in caplog.records] == [
        "dkd: train.epochs=5 ends before loss.warmup_epochs=20, so the DKD term reaches only 25% of its weight, "
        "in the last epoch; set loss.warmup_epochs=5 or fewer (0 for no warm-up)"]


def test_dist_value_and_gradient():
    loss = make("dist", inter_weight=2.0, intra_weight=0.5)
    student, teacher = outputs(loss, [], [])
    assert value(loss, student, teacher) == pytest.approx(mixed(ref_dist(S_LOGITS, T_LOGITS, TEMP, 2.0, 0.5)), rel=1e-7)
    want = numeric_grad(lambda s: ref_dist(s, T_LOGITS, TEMP, 2.0, 0.5), S_LOGITS)
    np.testing.assert_allclose(autograd_of_term(loss, [], [], "logits"), want, rtol=1e-5, atol=1e-7)


def test_tf_kd_uses_a_virtual_teacher_without_a_teacher_network():
    loss = make("tf_kd", correct_prob=0.9)
    assert loss.needs_teacher is False
    student = {"logits": torch.tensor(S_LOGITS)}
    got = loss(student, None, torch.tensor(TARGETS)).item()
    assert got == pytest.approx(mixed(ref_tf_kd(S_LOGITS, TARGETS, TEMP, 0.9)), rel=1e-10)
    want = numeric_grad(lambda s: ref_tf_kd(s, TARGETS, TEMP, 0.9), S_LOGITS)
    np.testing.assert_allclose(autograd_of_term(loss, [], [], "logits"), want, rtol=1e-6, atol=1e-9)


def test_tf_kd_with_a_real_teacher_is_kd():
    loss = make("tf_kd", virtual=False)
    assert loss.needs_teacher is True
    student, teacher = outputs(loss, [], [])
    kd = HintonKD(alpha=ALPHA, T=TEMP)(student, teacher, torch.tensor(TARGETS)).item()
    assert value(loss, student, teacher) == pytest.approx(kd, rel=1e-12)


# ---------------------------------------------------------------- feature-based

def test_fitnets_regressor_value_and_gradient():
    loss = with_layers(make("fitnets", weight=100.0), [(2, 5, 5)], [(3, 3, 3)])
    conv = loss.regressors[0]
    assert conv.kernel_size == (3, 3) and (conv.in_channels, conv.out_channels) == (2, 3)
    fs, ft = feats(B, 2, 5, 5), feats(B, 3, 3, 3)
    w, b = conv.weight.detach().double().numpy(), conv.bias.detach().double().numpy()
    loss.double()
    student, teacher = outputs(loss, [fs], [ft])
    hint = np.mean((ref_conv(fs, w, b) - ft) ** 2)
    assert value(loss, student, teacher) == pytest.approx(mixed(hint, weight=100.0), rel=1e-10)
    want = numeric_grad(lambda x: np.mean((ref_conv(x, w, b) - ft) ** 2), fs)
    np.testing.assert_allclose(autograd_of_term(loss, [fs], [ft], 0), want, rtol=1e-5, atol=1e-9)


def test_fitnets_two_stages():
    loss = with_layers(make("fitnets", weight=10.0, stage1_epochs=2), [(2, 4, 4)], [(2, 4, 4)])
    fs, ft = feats(B, 2, 4, 4), feats(B, 2, 4, 4)
    student, teacher = outputs(loss, [fs], [ft])
    student["logits"].requires_grad_(True)
    student["s0"].requires_grad_(True)
    loss.set_epoch(2)
    stage1 = loss(student, teacher, torch.tensor(TARGETS))
    assert stage1.item() == pytest.approx(10.0 * np.mean((fs - ft) ** 2), rel=1e-12)
    stage1.backward()
    assert student["logits"].grad is None  # stage 1 trains only up to the guided layer
    loss.set_epoch(3)
    kd = HintonKD(alpha=ALPHA, T=TEMP)(student, teacher, torch.tensor(TARGETS)).item()
    assert value(loss, student, teacher) == pytest.approx(kd, rel=1e-12)


def test_fitnets_without_stages_adds_the_hint_to_ce():
    loss = with_layers(make("fitnets", weight=10.0), [(2, 4, 4)], [(2, 4, 4)])
    fs, ft = feats(B, 2, 4, 4), feats(B, 2, 4, 4)
    for epoch in (1, 50):
        loss.set_epoch(epoch)
        assert value(loss, *outputs(loss, [fs], [ft])) == pytest.approx(mixed(np.mean((fs - ft) ** 2), weight=10.0))


def test_feature_mse_is_the_tutorial_regressor():
    loss = with_layers(make("feature_mse"), [(2, 4, 4)], [(3, 4, 4)])
    conv = loss.regressors[0]
    assert (conv.kernel_size, conv.padding, conv.out_channels) == ((3, 3), (1, 1), 3)
    loss.double()
    fs, ft = feats(B, 2, 4, 4), feats(B, 3, 4, 4)
    w, b = conv.weight.detach().numpy(), conv.bias.detach().numpy()
    want = np.mean((ref_conv(fs, w, b, padding=1) - ft) ** 2)
    assert value(loss, *outputs(loss, [fs], [ft])) == pytest.approx(mixed(want), rel=1e-10)


def test_cosine_pools_the_teacher_to_the_students_width():
    loss = with_layers(make("cosine"), [(2, 2, 2)], [(4, 2, 2)])
    fs, ft = feats(B, 2, 2, 2), feats(B, 4, 2, 2)
    s, t = fs.reshape(B, -1), ft.reshape(B, -1).reshape(B, 8, 2).mean(axis=2)
    cos = np.sum(s * t, axis=1) / (np.linalg.norm(s, axis=1) * np.linalg.norm(t, axis=1))
    assert value(loss, *outputs(loss, [fs], [ft])) == pytest.approx(mixed(np.mean(1 - cos)), rel=1e-10)

    def ref(x):
        x = x.reshape(B, -1)
        return np.mean(1 - np.sum(x * t, axis=1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(t, axis=1)))

    np.testing.assert_allclose(autograd_of_term(loss, [fs], [ft], 0), numeric_grad(ref, fs), rtol=1e-5, atol=1e-9)


def test_at_sums_layer_pairs_and_pools_the_larger_map():
    loss = with_layers(make("at", weight=1000.0), [(2, 4, 4), (3, 2, 2)], [(5, 8, 8), (4, 2, 2)])
    s1, s2, t1, t2 = feats(B, 2, 4, 4), feats(B, 3, 2, 2), feats(B, 5, 8, 8), feats(B, 4, 2, 2)
    term = ref_at_pair(s1, t1) + ref_at_pair(s2, t2)
    assert value(loss, *outputs(loss, [s1, s2], [t1, t2])) == pytest.approx(mixed(term, weight=1000.0), rel=1e-10)
    want = numeric_grad(lambda x: ref_at_pair(x, t1), s1)
    np.testing.assert_allclose(autograd_of_term(loss, [s1, s2], [t1, t2], 0), want, rtol=1e-5, atol=1e-9)


def test_at_ignores_channel_counts():
    """Attention is a channel mean: a teacher that repeats the student's channels has its attention."""
    loss = with_layers(make("at"), [(2, 3, 3)], [(4, 3, 3)])
    fs = feats(B, 2, 3, 3)
    assert loss.term(*outputs(loss, [fs], [np.concatenate([fs, fs], axis=1)]), torch.tensor(TARGETS)).item() < 1e-15


def test_nst_value_and_gradient():
    loss = with_layers(make("nst"), [(2, 3, 3)], [(3, 3, 3)])
    fs, ft = feats(B, 2, 3, 3), feats(B, 3, 3, 3)
    assert value(loss, *outputs(loss, [fs], [ft])) == pytest.approx(mixed(ref_nst_pair(fs, ft), weight=50.0), rel=1e-10)
    want = numeric_grad(lambda x: ref_nst_pair(x, ft), fs)
    np.testing.assert_allclose(autograd_of_term(loss, [fs], [ft], 0), want, rtol=1e-5, atol=1e-9)


# ---------------------------------------------------------------- relation-based

def test_fsp_value_and_gradient():
    loss = with_layers(make("fsp"), [(2, 4, 4), (3, 4, 4)], [(2, 4, 4), (3, 4, 4)])
    maps_s = [feats(B, 2, 4, 4), feats(B, 3, 4, 4)]
    maps_t = [feats(B, 2, 4, 4), feats(B, 3, 4, 4)]
    assert len(list(loss.parameters())) == 0  # equal widths: the paper's setting, no helper
    assert value(loss, *outputs(loss, maps_s, maps_t)) == pytest.approx(mixed(ref_fsp(maps_s, maps_t), weight=50.0), rel=1e-10)
    want = numeric_grad(lambda x: ref_fsp([x, maps_s[1]], maps_t), maps_s[0])
    np.testing.assert_allclose(autograd_of_term(loss, maps_s, maps_t, 0), want, rtol=1e-5, atol=1e-9)


def test_fsp_pools_and_adapts_the_students_widths():
    loss = with_layers(make("fsp"), [(2, 4, 4), (3, 2, 2)], [(4, 4, 4), (3, 2, 2)])
    adapter = loss.adapters[0]
    assert (adapter.in_channels, adapter.out_channels, adapter.kernel_size) == (2, 4, (1, 1))
    loss.double()
    maps_s = [feats(B, 2, 4, 4), feats(B, 3, 2, 2)]
    maps_t = [feats(B, 4, 4, 4), feats(B, 3, 2, 2)]
    adapted = ref_conv(maps_s[0], adapter.weight.detach().numpy(), adapter.bias.detach().numpy())
    want = ref_fsp([block_mean(adapted, 2), maps_s[1]], [block_mean(maps_t[0], 2), maps_t[1]])
    assert loss.term(*outputs(loss, maps_s, maps_t), torch.tensor(TARGETS)).item() == pytest.approx(want, rel=1e-10)


def test_fsp_two_stages_are_fsp_then_labels_alone():
    loss = with_layers(make("fsp", weight=5.0, stage1_epochs=1), [(2, 4, 4), (3, 4, 4)], [(2, 4, 4), (3, 4, 4)])
    maps_s = [feats(B, 2, 4, 4), feats(B, 3, 4, 4)]
    maps_t = [feats(B, 2, 4, 4), feats(B, 3, 4, 4)]
    loss.set_epoch(1)
    assert value(loss, *outputs(loss, maps_s, maps_t)) == pytest.approx(5.0 * ref_fsp(maps_s, maps_t), rel=1e-10)
    loss.set_epoch(2)
    assert value(loss, *outputs(loss, maps_s, maps_t)) == pytest.approx(cross_entropy(S_LOGITS, TARGETS), rel=1e-12)


def test_rkd_value_and_gradient():
    loss = with_layers(make("rkd"), [(3,)], [(6,)])
    fs, ft = feats(B, 3), feats(B, 6)
    assert value(loss, *outputs(loss, [fs], [ft])) == pytest.approx(mixed(ref_rkd(fs, ft)), rel=1e-9)
    want = numeric_grad(lambda x: ref_rkd(x, ft), fs)
    np.testing.assert_allclose(autograd_of_term(loss, [fs], [ft], 0), want, rtol=1e-4, atol=1e-7)


def test_sp_value_and_gradient():
    loss = with_layers(make("sp"), [(2, 2, 2)], [(3, 2, 2)])
    fs, ft = feats(B, 2, 2, 2), feats(B, 3, 2, 2)
    assert value(loss, *outputs(loss, [fs], [ft])) == pytest.approx(mixed(ref_sp(fs, ft), weight=3000.0), rel=1e-10)
    np.testing.assert_allclose(autograd_of_term(loss, [fs], [ft], 0), numeric_grad(lambda x: ref_sp(x, ft), fs),
                               rtol=1e-5, atol=1e-9)


def test_pkt_value_and_gradient():
    loss = with_layers(make("pkt"), [(3,)], [(5,)])
    fs, ft = feats(B, 3), feats(B, 5)
    assert value(loss, *outputs(loss, [fs], [ft])) == pytest.approx(mixed(ref_pkt(fs, ft), weight=30000.0), rel=1e-9)
    np.testing.assert_allclose(autograd_of_term(loss, [fs], [ft], 0), numeric_grad(lambda x: ref_pkt(x, ft), fs),
                               rtol=1e-5, atol=1e-9)


def test_cc_value_gradient_and_its_kernel():
    loss = with_layers(make("cc"), [(3,)], [(5,)])
    fs, ft = feats(B, 3), feats(B, 5)
    assert value(loss, *outputs(loss, [fs], [ft])) == pytest.approx(mixed(ref_cc(fs, ft), weight=0.02), rel=1e-10)
    np.testing.assert_allclose(autograd_of_term(loss, [fs], [ft], 0), numeric_grad(lambda x: ref_cc(x, ft), fs),
                               rtol=1e-5, atol=1e-9)
    # A long enough Taylor series is the Gaussian RBF kernel itself on the normalised vectors.
    long = with_layers(make("cc", gamma=0.4, order=25), [(3,)], [(3,)])
    unit = fs / np.linalg.norm(fs, axis=1, keepdims=True)
    rbf = np.exp(-0.4 * np.sum((unit[:, None] - unit[None]) ** 2, axis=2))
    np.testing.assert_allclose(long.correlation(torch.tensor(fs)).numpy(), rbf, rtol=1e-12)


# ---------------------------------------------------------------- contrastive

def test_crd_value_memory_and_normaliser():
    n, k, dim = 12, 6, 4
    loss = with_layers(make("crd", feat_dim=dim, nce_k=k, nce_t=0.5, momentum=0.25), [(3,)], [(5,)], num_train=n).double()
    idx = torch.tensor([0, 4, 7, 11, 2])
    torch.manual_seed(3)
    negatives = loss.negatives(idx)
    assert not (negatives == idx[:, None]).any()  # a sample is never its own negative
    assert negatives.min() >= 0 and negatives.max() < n
    loss.negatives = lambda indices: negatives
    fs, ft = feats(B, 3), feats(B, 5)
    mem_s, mem_t = loss.memory_student.numpy().copy(), loss.memory_teacher.numpy().copy()
    w_s, b_s = loss.embed_student.weight.detach().numpy(), loss.embed_student.bias.detach().numpy()
    w_t, b_t = loss.embed_teacher.weight.detach().numpy(), loss.embed_teacher.bias.detach().numpy()

    def embed(x, w, b):
        v = x @ w.T + b
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    v_s, v_t = embed(fs, w_s, b_s), embed(ft, w_t, b_t)
    cand = np.concatenate([idx.numpy()[:, None], negatives.numpy()], axis=1)

    def nce(scores):
        z = scores.mean() * n  # fixed from this, the first batch
        p = scores / z
        noise = k / n
        return -(np.sum(np.log(p[:, 0] / (p[:, 0] + noise))) + np.sum(np.log(noise / (p[:, 1:] + noise)))) / B

    scores_s = np.exp(np.einsum("bkd,bd->bk", mem_t[cand], v_s) / 0.5)
    scores_t = np.exp(np.einsum("bkd,bd->bk", mem_s[cand], v_t) / 0.5)
    term = nce(scores_s) + nce(scores_t)
    student, teacher = outputs(loss, [fs], [ft])
    assert value(loss, student, teacher, indices=idx) == pytest.approx(mixed(term, weight=0.8), rel=1e-6)
    # Each image's bank entries moved towards its new embeddings; the others are untouched.
    for bank, old, v in ((loss.memory_student, mem_s, v_s), (loss.memory_teacher, mem_t, v_t)):
        moved = 0.25 * old[idx.numpy()] + 0.75 * v
        np.testing.assert_allclose(bank.numpy()[idx.numpy()], moved / np.linalg.norm(moved, axis=1, keepdims=True), rtol=1e-10)
        others = np.setdiff1d(np.arange(n), idx.numpy())
        np.testing.assert_array_equal(bank.numpy()[others], old[others])
    # The normalisers stay those of the first batch.
    z = loss.normalizers.clone()
    loss(student, teacher, torch.tensor(TARGETS), indices=idx)
    assert torch.equal(loss.normalizers, z)


def test_crd_leaves_its_memory_alone_in_eval_mode_and_checkpoints_it(caplog):
    with caplog.at_level(logging.INFO, logger="kd_cli.losses.contrastive"):
        loss = with_layers(make("crd", feat_dim=8, nce_k=5), [(3,)], [(5,)], num_train=20)
    assert "memory banks of 2 x 20 x 8 floats" in caplog.text and "grow with the training set" in caplog.text
    state = loss.state_dict()
    assert {"memory_student", "memory_teacher", "normalizers"} <= set(state)
    before = loss.memory_student.clone()
    loss.eval()
    student, teacher = outputs(loss, [feats(B, 3)], [feats(B, 5)])
    student = {k: v.float() for k, v in student.items()}
    teacher = {k: v.float() for k, v in teacher.items()}
    loss(student, teacher, torch.tensor(TARGETS), indices=torch.arange(B))
    assert torch.equal(loss.memory_student, before)
    restored = with_layers(make("crd", feat_dim=8, nce_k=5), [(3,)], [(5,)], num_train=20)
    restored.load_state_dict(loss.state_dict())
    assert torch.equal(restored.memory_teacher, loss.memory_teacher) and torch.equal(restored.normalizers, loss.normalizers)


# ---------------------------------------------------------------- combinations

def test_combo_of_kd_alone_is_kd():
    combo = make("combo", terms={"kd": 1.0})
    student, teacher = outputs(combo, [], [])
    kd = HintonKD(alpha=ALPHA, T=TEMP)(student, teacher, torch.tensor(TARGETS)).item()
    assert value(combo, student, teacher) == pytest.approx(kd, rel=1e-12)


def test_combo_is_ce_plus_the_weighted_terms():
    combo = make("combo", terms=OmegaConf.create({"kd": 0.5, "at": {"weight": 700, "p": 2}, "logits_mse": 3}))
    for term in combo.terms.values():  # layers as attach() would give them
        if term.layer_kind:
            with_layers(term, [(2, 4, 4)], [(3, 4, 4)])
    combo.student_layers, combo.teacher_layers = ["s0"], ["t0"]
    fs, ft = feats(B, 2, 4, 4), feats(B, 3, 4, 4)
    student, teacher = outputs(combo, [fs], [ft])
    kd_term = TEMP**2 * ref_kl(softmax(T_LOGITS / TEMP), softmax(S_LOGITS / TEMP))
    want = mixed(0.5 * kd_term + 700 * ref_at_pair(fs, ft) + 3 * ref_logits_mse(S_LOGITS, T_LOGITS))
    assert value(combo, student, teacher) == pytest.approx(want, rel=1e-10)


def test_combo_hooks_the_union_of_its_terms_layers_and_owns_their_helpers():
    spec = ImageSpec(1, 28, 10)
    student = build_model(OmegaConf.create({"arch": "lightnn"}), spec)
    teacher = build_model(OmegaConf.create({"arch": "deepnn"}), spec)
    combo = build_loss(OmegaConf.create({"loss": {"name": "combo", "terms": {"at": 1000, "fitnets": 100, "pkt": 30000}},
                                         "alpha": 0.5, "T": 4.0}))
    combo.attach(student, teacher, torch.zeros(2, 1, 28, 28), 100)
    assert combo.student_layers == ["features.2", "features.5", "classifier.3:in"]
    assert combo.teacher_layers == ["features.4", "features.9", "classifier.3:in"]
    assert sum(p.numel() for p in combo.parameters()) == sum(p.numel() for p in combo.terms["fitnets"].parameters()) > 0
    assert all(key.startswith("terms.fitnets.") for key in combo.state_dict())


def test_combo_needs_a_teacher_only_when_a_term_does():
    assert make("combo", terms={"tf_kd": 1.0}).needs_teacher is False
    assert make("combo", terms={"tf_kd": 1.0, "kd": 1.0}).needs_teacher is True


@pytest.mark.parametrize("terms, message", [
    (None, "loss=combo needs loss.terms"),
    ({"ce": 1.0}, "'ce' cannot be a combo term"),
    ({"combo": 1.0}, "'combo' cannot be a combo term"),
    ({"nope": 1.0}, "'nope' cannot be a combo term; choose from: at, cc, cosine, crd"),
    ({"at": "lots"}, "loss.terms.at: the weight must be a number"),
    ({"kd": {"weight": 1, "T": 2}}, "loss.terms.kd takes only a weight"),
    ({"fitnets": {"stage1_epochs": 3}}, "stage1_epochs applies to loss=fitnets on its own"),
    ({"at": {"q": 3}}, "loss=at has no option 'q'; its options are: p, student_layers, teacher_layers, weight"),
])
def test_combo_rejects_what_it_cannot_build(terms, message):
    with pytest.raises(KdError, match=message) as err:
        make("combo", terms=terms)
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------- properties of every method

SPEC = ImageSpec(1, 28, 10)
METHODS = sorted(name for name in LOSSES if name not in ("ce", "kd", "combo"))
OPTIONS = {"crd": {"nce_k": 7, "feat_dim": 6}}


def attached(name, alpha=1.0, T=4.0, student_arch="lightnn", teacher_arch="deepnn", **options):
    torch.manual_seed(0)
    student = build_model(OmegaConf.create({"arch": student_arch}), SPEC)
    teacher = build_model(OmegaConf.create({"arch": teacher_arch}), SPEC)
    loss = build_loss(OmegaConf.create({"loss": {"name": name, **OPTIONS.get(name, {}), **options}, "alpha": alpha, "T": T}))
    loss.attach(student, teacher, torch.zeros(2, 1, 28, 28), 30)
    return loss, student, teacher


def random_outputs(loss, student_model, teacher_model, n=6):
    """Per-layer tensors of each model's real shapes; the teacher's require grad, to catch any leak."""
    torch.manual_seed(1)
    x = torch.randn(n, 1, 28, 28)
    out = {}
    for role, model, layers in (("student", student_model, loss.student_layers), ("teacher", teacher_model, loss.teacher_layers)):
        taps = FeatureTaps(model, layers, role)
        with torch.no_grad():
            logits = model.eval()(x)
        out[role] = {"logits": logits, **taps.pop()}
        taps.remove()
        out[role] = {k: (v.detach().clone() + 0.1 * torch.randn_like(v)).requires_grad_(True) for k, v in out[role].items()}
    return out["student"], out["teacher"]


@pytest.mark.parametrize("name", METHODS)
def test_gradients_reach_the_student_and_its_helpers_never_the_teacher(name):
    loss, student_model, teacher_model = attached(name)  # alpha=1: the method's own term alone
    student, teacher = random_outputs(loss, student_model, teacher_model)
    frozen = {k: v.detach().clone() for k, v in teacher.items()}
    targets = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(2))
    value_ = loss(student, teacher if loss.needs_teacher else None, targets, indices=torch.arange(6))
    assert torch.isfinite(value_)
    value_.backward()
    assert all(t.grad is None for t in teacher.values()), "the teacher received a gradient"
    for k, v in teacher.items():  # the teacher cache hands the same tensors every epoch
        assert torch.equal(v.detach(), frozen[k]), f"the loss modified the teacher's '{k}'"
    used = loss.student_layers or ["logits"]
    for key in used:
        grad = student[key].grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, f"no gradient at '{key}'"
    for pname, p in loss.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"helper {pname} gets no gradient"


USES = [(name, {}) for name in sorted(LOSSES) if name != "combo"] + [
    ("fitnets", {"stage1_epochs": 1}), ("fsp", {"stage1_epochs": 1}), ("combo", {"terms": {"at": 1000.0}}), ("combo", {"terms": {"at": 1000.0, "kd": 1.0}})]


@pytest.mark.parametrize("name, options", USES, ids=[f"{n} {o}" if o else n for n, o in USES])
def test_uses_names_exactly_the_settings_the_value_depends_on(name, options):
    """`uses` is what the command line's warning about an ignored alpha or T rests on."""
    def values_per_epoch_and_uses(alpha, T):
        loss, student_model, teacher_model = attached(name, alpha=alpha, T=T, **options)
        student, teacher = random_outputs(loss, student_model, teacher_model)
        targets = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(2))
        values = []
        for epoch in (1, 2):  # both stages of the two-stage options
            loss.set_epoch(epoch)
            torch.manual_seed(3)  # crd draws its negatives
            values.append(loss(student, teacher if loss.needs_teacher else None, targets, indices=torch.arange(6)).item())
        return values, loss.uses

    base, uses = values_per_epoch_and_uses(0.5, 4.0)
    assert uses <= {"alpha", "T"}
    assert (values_per_epoch_and_uses(0.8, 4.0)[0] != base) == ("alpha" in uses)
    assert (values_per_epoch_and_uses(0.5, 2.0)[0] != base) == ("T" in uses)


def _same_outputs(loss, shapes, logits=S_LOGITS):
    with_layers(loss, shapes, shapes)
    fs = [feats(B, *shape) for shape in shapes]
    student, _ = outputs(loss, fs, fs, s_logits=logits, t_logits=logits)
    teacher = {k.replace("s", "t", 1) if k != "logits" else k: v.clone() for k, v in student.items()}
    for v in student.values():
        v.requires_grad_(True)
    return student, teacher


ZERO_AT_EQUALITY = {
    "logits_mse": [], "dkd": [], "dist": [], "fitnets": [(3, 4, 4)], "feature_mse": [(3, 4, 4)],
    "cosine": [(3, 4, 4)], "at": [(3, 4, 4), (2, 2, 2)], "nst": [(3, 4, 4), (2, 2, 2)],
    "fsp": [(3, 4, 4), (2, 2, 2)], "rkd": [(6,)], "sp": [(3, 4, 4)], "pkt": [(6,)], "cc": [(6,)],
}


@pytest.mark.parametrize("name", sorted(ZERO_AT_EQUALITY))
def test_zero_when_the_student_equals_the_teacher(name):
    loss = make(name)
    student, teacher = _same_outputs(loss, ZERO_AT_EQUALITY[name])
    term = loss.term(student, teacher, torch.tensor(TARGETS))
    assert abs(term.item()) < 1e-12
    assert len(list(loss.parameters())) == 0  # equal shapes: nothing to regress
    term.backward()
    for key in loss.student_layers or ["logits"]:
        assert student[key].grad.abs().max() < 1e-6, f"{name} is not at a minimum ({key})"


def test_soft_ce_is_minimal_not_zero_at_equality():
    loss = make("soft_ce")
    student, teacher = _same_outputs(loss, [])
    term = loss.term(student, teacher, torch.tensor(TARGETS))
    p = softmax(S_LOGITS / TEMP)
    assert term.item() == pytest.approx(TEMP**2 * np.mean(-np.sum(p * np.log(p), axis=1)), rel=1e-12)
    term.backward()
    assert student["logits"].grad.abs().max() < 1e-12


def test_tf_kd_is_zero_when_the_student_predicts_the_virtual_teacher():
    loss = make("tf_kd", correct_prob=0.8)
    logits = loss.virtual_logits(torch.tensor(TARGETS), K, torch.float64) + 5.0  # a shift changes no softmax
    assert abs(loss.term({"logits": logits}, None, torch.tensor(TARGETS)).item()) < 1e-12


@pytest.mark.parametrize("name, make_teacher", [
    ("rkd", lambda s: 3.0 * s + 1.0),   # distances are normalised, angles scale- and shift-free
    ("sp", lambda s: 2.5 * s),          # Gram rows are normalised
    ("pkt", lambda s: 4.0 * s),         # cosine similarities
    ("cc", lambda s: 0.5 * s),          # normalised embeddings
])
def test_relation_methods_ignore_scale(name, make_teacher):
    loss = with_layers(make(name), [(6,)], [(6,)])
    fs = feats(B, 6)
    assert abs(loss.term(*outputs(loss, [fs], [make_teacher(fs)]), torch.tensor(TARGETS)).item()) < 1e-12


# ---------------------------------------------------------------- bad pairings and options

@pytest.mark.parametrize("name, student_shapes, teacher_shapes, message", [
    ("fitnets", [(4, 3, 3)], [(8, 5, 5)], "student layer 's0' and teacher layer 't0' have 3x3 and 5x5 maps; the regressor can only shrink"),
    ("feature_mse", [(4, 6, 6)], [(8, 3, 3)], "student layer 's0' and teacher layer 't0' have 6x6 and 3x3 maps; feature_mse needs equal sizes"),
    ("cosine", [(8, 4, 4)], [(2, 4, 4)], "flatten to 128 and 32 values"),
    ("at", [(16,)], [(4, 2, 2)], "loss=at needs feature maps"),
    ("nst", [(4, 2, 2)], [(16,)], "loss=nst needs feature maps"),
    ("fsp", [(4, 2, 2)], [(4, 2, 2)], "loss=fsp needs at least two layers per model"),
])
def test_pairings_that_cannot_match_fail_in_setup_naming_the_layer(name, student_shapes, teacher_shapes, message):
    with pytest.raises(KdError, match=message) as err:
        with_layers(make(name), student_shapes, teacher_shapes)
    assert "\n" not in str(err.value)


def test_a_layer_that_does_not_exist_lists_the_valid_paths():
    with pytest.raises(KdError, match="the student has no layer 'features.99'; valid paths .*features.5") as err:
        attached("at", student_layers=["features.99", "features.5"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("side, path", [("teacher", "features.0"), ("student", "features.1"), ("student", "features.2:in")])
def test_a_layer_a_later_one_overwrites_in_place_is_refused(side, path):
    """DeepNN's first conv feeds ReLU(inplace=True), as does LightNN's first pooling: the tensor taken there
    would hold the ReLU's result by the time the loss reads it."""
    layers = {"student_layers": ["features.2"], "teacher_layers": ["features.4"]} | {f"{side}_layers": [path]}
    with pytest.raises(KdError, match=rf"^kd: error: the {side}'s layer '{path}' is overwritten in place by a layer "
                                      r"after it \(such as ReLU\(inplace=True\)\)") as err:
        attached("at", **layers)
    assert "\n" not in str(err.value)


def test_a_layer_that_runs_twice_or_never_in_a_pass_is_refused():
    """A ResNet block calls its one ReLU twice (a hook would keep the block's output), and a module the
    forward pass never calls gives nothing: either is refused at attach, before anything trains."""
    with pytest.raises(KdError, match=r"^kd: error: the teacher's layer 'layer1.0.relu' ran 2 times in one forward "
                                      r"pass, so it gives no single output; choose a layer that runs once per pass$"):
        attached("at", teacher_arch="resnet18", student_layers=["features.2"], teacher_layers=["layer1.0.relu"])
    student, teacher = (build_model(OmegaConf.create({"arch": arch}), SPEC) for arch in ("lightnn", "deepnn"))
    student.spare = torch.nn.ReLU()
    loss = build_loss(OmegaConf.create({"loss": {"name": "at", "student_layers": ["spare"], "teacher_layers": ["features.4"]},
                                        "alpha": 1.0, "T": 4.0}))
    with pytest.raises(KdError, match=r"^kd: error: the student's layer 'spare' did not run in one forward pass"):
        loss.attach(student, teacher, torch.zeros(2, 1, 28, 28), 30)
    # A layer paired with two of the other model's is taken once, and runs once.
    at, _, _ = attached("at", student_layers=["features.2", "features.5", "features.5"],
                        teacher_layers=["features.4", "features.9", "features.9"])
    assert at.student_layers == ["features.2", "features.5", "features.5"]


def test_crd_takes_one_layer_pair():
    with pytest.raises(KdError, match=r"^kd: error: loss=crd contrasts one layer pair \(an embedding of each model\), but "
                                      r"loss.student_layers / loss.teacher_layers give 2; give one layer each$"):
        attached("crd", student_layers=["features.5", "classifier.3:in"], teacher_layers=["features.9", "classifier.3:in"])


def test_a_misspelt_path_on_one_side_is_named_not_the_layer_counts():
    with pytest.raises(KdError, match="the student has no layer 'features.99'; valid paths"):
        attached("at", student_layers=["features.99"])  # the teacher's defaults are two stages


def test_default_layers_come_from_the_models():
    at, _, _ = attached("at")
    assert (at.student_layers, at.teacher_layers) == (["features.2", "features.5"], ["features.4", "features.9"])
    fitnets, _, _ = attached("fitnets")
    assert (fitnets.student_layers, fitnets.teacher_layers) == (["features.5"], ["features.9"])
    crd, _, _ = attached("crd")
    assert (crd.student_layers, crd.teacher_layers) == (["classifier.3:in"], ["classifier.3:in"])


def test_unequal_stage_counts_pair_the_deepest_stages_unless_layers_are_given():
    at, _, _ = attached("at", teacher_arch="light6")  # lightnn has 2 stages, light6 3
    assert (at.student_layers, at.teacher_layers) == (["features.2", "features.5"], ["features.13", "features.20"])
    at, _, _ = attached("at", teacher_arch="light6", teacher_layers=["features.6", "features.13"])
    assert at.teacher_layers == ["features.6", "features.13"]
    with pytest.raises(KdError, match=r"loss.student_layers has 2 layers \(its default: features.2, features.5\) "
                                      r"and loss.teacher_layers 3 layers;"):
        attached("at", teacher_arch="light6", teacher_layers=["features.6", "features.13", "features.20"])
    with pytest.raises(KdError, match=r"loss.student_layers has 1 layer and loss.teacher_layers 2 layers \(its default"):
        attached("at", student_layers=["features.2"])
    with pytest.raises(KdError, match=r"loss.student_layers has 1 layer and loss.teacher_layers 2 layers; give"):
        attached("at", student_layers=["features.2"], teacher_layers=["features.4", "features.9"])  # both given


def test_a_misspelt_option_is_an_error_not_ignored():
    with pytest.raises(KdError, match=re.escape("loss=rkd has no option 'angel_weight' (did you mean 'angle_weight'?); "
                                                "its options are: angle_weight, distance_weight")):
        build_loss(OmegaConf.create({"loss": {"name": "rkd", "angel_weight": 3}, "alpha": 0.5, "T": 4}))


@pytest.mark.parametrize("loss, message", [
    ({"name": "kd", "gamma": 1}, "loss=kd has no option 'gamma'; it takes no loss.* options"),
    ({"name": "ce", "weight": 2}, "loss=ce has no option 'weight'; it takes no loss.* options"),
    ({"name": "dkd", "student_layers": ["features.0"]},
     "loss=dkd has no option 'student_layers'; its options are: nckd_weight, tckd_weight, warmup_epochs, weight"),
    ({"name": "combo", "terms": {"kd": 1}, "student_layers": ["features.0"]}, "loss=combo takes layers per term"),
    ({"name": "combo", "terms": {"dkd": {"weight": 1, "student_layers": ["features.0"]}}},
     "loss.terms.dkd: loss=dkd has no option 'student_layers'"),
    ({"name": "at", "weight": "abc"}, "loss=at: could not convert string to float: 'abc'; check the loss.* values"),
    # Values that would run and quietly give a meaningless student.
    ({"name": "at", "weight": -5}, "loss=at: loss.weight must be >= 0 (a negative weight maximises its term)"),
    ({"name": "dkd", "nckd_weight": -8}, "loss=dkd: loss.nckd_weight must be >= 0 (a negative weight maximises its term)"),
    ({"name": "dist", "intra_weight": -1}, "loss=dist: loss.intra_weight must be >= 0"),
    ({"name": "rkd", "angle_weight": -50}, "loss=rkd: loss.angle_weight must be >= 0"),
    ({"name": "at", "p": 0}, "loss=at: loss.p must be >= 1"),
    ({"name": "at", "p": 0.5}, "loss=at: loss.p must be >= 1"),  # NaN gradients where a ReLU's output is 0
    ({"name": "dkd", "warmup_epochs": -1}, "loss=dkd: loss.warmup_epochs must be a whole number of epochs >= 0, got -1"),
    ({"name": "fsp", "stage1_epochs": 1.5}, "loss=fsp: loss.stage1_epochs must be a whole number of epochs >= 0, got 1.5"),
    ({"name": "nst", "degree": 2.5}, "loss=nst: loss.degree must be a whole number >= 1, got 2.5"),  # not truncated to 2
    ({"name": "cc", "order": 1.9}, "loss=cc: loss.order must be a whole number >= 1, got 1.9"),
    ({"name": "cc", "order": 0}, "loss=cc: loss.order must be a whole number >= 1, got 0"),  # a constant term
    ({"name": "cc", "order": -1}, "loss=cc: loss.order must be a whole number >= 1, got -1"),  # was a traceback
    ({"name": "cc", "gamma": 0}, "loss=cc: loss.gamma must be > 0"),
    ({"name": "crd", "feat_dim": 0.5}, "loss=crd: loss.feat_dim must be a whole number >= 1, got 0.5"),
    ({"name": "crd", "nce_k": 0}, "loss=crd: loss.nce_k must be a whole number >= 1, got 0"),
    ({"name": "crd", "nce_t": 0}, "loss=crd: loss.nce_t must be > 0"),
    ({"name": "crd", "momentum": 1}, "loss=crd: loss.momentum must be in [0, 1)"),
    ({"name": "combo", "terms": {"kd": -1}}, "loss.terms.kd: the weight must be >= 0, got -1"),
    ({"name": "combo", "terms": {"at": {"weight": 1, "p": 0}}}, "loss.terms.at: loss.p must be >= 1"),
])
def test_every_loss_rejects_options_it_does_not_take(loss, message):
    with pytest.raises(KdError, match=re.escape(message)):
        build_loss(OmegaConf.create({"loss": loss, "alpha": 0.5, "T": 4}))


def test_hint_epochs_must_leave_epochs_for_the_labels():
    from kd_cli.bench.sides import compose_config

    compose_config("distill", ["loss=fitnets", "loss.stage1_epochs=1", "train.epochs=2"])
    with pytest.raises(KdError, match=re.escape("loss.stage1_epochs=2 covers every epoch of train.epochs=2")):
        compose_config("distill", ["loss=fitnets", "loss.stage1_epochs=2", "train.epochs=2"])


def test_tf_kd_rejects_an_impossible_probability():
    with pytest.raises(KdError, match=r"loss.correct_prob must be in \(0, 1\]"):
        make("tf_kd", correct_prob=1.5)


# ---------------------------------------------------------------- configs and docs

LOSS_YAMLS = sorted(p for p in (REPO / "conf" / "loss").glob("*.yaml") if p.stem not in ("ce", "kd"))


def test_every_method_has_a_yaml_and_every_yaml_a_method():
    assert sorted(p.stem for p in LOSS_YAMLS) == sorted(n for n in LOSSES if n not in ("ce", "kd"))


@pytest.mark.parametrize("path", sorted((REPO / "conf" / "loss").glob("*.yaml")), ids=lambda p: p.stem)
def test_yaml_keys_are_the_options_and_its_defaults_the_constructors(path):
    """The yaml is what users read and override: every option is there, and nothing the loss would
    refuse in preflight. The class defaults are what combo terms use."""
    config = yaml.safe_load(path.read_text())
    cls = LOSSES[config.pop("name")]
    assert set(config) == set(cls.option_names())
    defaults = {}
    for klass in reversed(cls.__mro__):
        if "__init__" in vars(klass) and issubclass(klass, DistillationLoss):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.default is not inspect.Parameter.empty:
                    defaults[p.name] = p.default
    for key in config:
        assert config[key] == defaults[key], key


def test_methods_doc_covers_every_method():
    doc = (REPO / "docs" / "methods.md").read_text()
    for name in LOSSES:
        assert f"| `{name}` |" in doc, name


def test_every_method_but_kd_and_ce_mixes_with_ce_through_weighted_term():
    assert issubclass(Combo, WeightedTerm)
    assert {n for n in LOSSES if not issubclass(LOSSES[n], WeightedTerm)} == {"ce", "kd"}


def test_one_layer_path_without_brackets_is_a_list_of_one():
    """loss.student_layers=features.2 on the command line is a string: one path, not one path per letter."""
    loss = build_loss(OmegaConf.create({"loss": {"name": "at", "student_layers": "features.2", "teacher_layers": "layer4"},
                                        "alpha": 0.5, "T": 4.0}))
    assert (loss.student_layers, loss.teacher_layers) == (["features.2"], ["layer4"])
