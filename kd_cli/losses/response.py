"""Response-based methods: the student matches the teacher's logits or class probabilities.

Each is (1 - alpha) * CE + alpha * weight * term (kd_cli/losses/weighted.py); `T` is the top-level
temperature wherever a method softens probabilities.
"""

import logging
import math

import torch
import torch.nn.functional as F

from kd_cli.errors import KdError
from kd_cli.losses.hinton import soft_target_kl
from kd_cli.losses.weighted import WeightedTerm

log = logging.getLogger(__name__)


class LogitsMSE(WeightedTerm, name="logits_mse"):
    """Ba & Caruana (2014): regress the teacher's logits, 1/2 * sum over classes of squared error.

    Summed over classes and averaged over the batch, as in the paper; F.mse_loss's default would
    also divide by the class count and drop the 1/2. Temperature-free: T does not apply.
    """

    regresses_logits = True

    def term(self, student, teacher, targets, indices=None):
        diff = student["logits"] - teacher["logits"].detach()
        return 0.5 * diff.pow(2).sum(1).mean()


class SoftCrossEntropy(WeightedTerm, name="soft_ce"):
    """T^2 * cross-entropy H(p_teacher^T, p_student^T), averaged over the batch.

    It equals kd's T^2 * KL plus T^2 times the teacher's entropy, which does not depend on the
    student: the gradients are kd's, only the reported loss is higher.
    """

    uses = frozenset({"alpha", "T"})

    def term(self, student, teacher, targets, indices=None):
        p_teacher = F.softmax(teacher["logits"].detach() / self.T, dim=1)
        log_p_student = F.log_softmax(student["logits"] / self.T, dim=1)
        return -(p_teacher * log_p_student).sum(1).mean() * self.T**2


def decoupled_kl(student_logits, teacher_logits, targets, T: float):
    """Per-sample TCKD and NCKD of Zhao et al. (2022), before the T^2 factor.

    TCKD is the KL between the binary (target, rest) distributions; NCKD the KL between the
    distributions over the non-target classes alone. KD's KL = TCKD + (1 - p_teacher[target]) * NCKD.
    """
    log_s = F.log_softmax(student_logits / T, dim=1)
    log_t = F.log_softmax(teacher_logits / T, dim=1)
    target = F.one_hot(targets, student_logits.shape[1]).bool()
    y = targets[:, None]
    # log(1 - p[target]) as a log-sum over the other classes: no cancellation when p[target] -> 1.
    s_bin = torch.stack([log_s.gather(1, y)[:, 0], log_s.masked_fill(target, -math.inf).logsumexp(1)], 1)
    t_bin = torch.stack([log_t.gather(1, y)[:, 0], log_t.masked_fill(target, -math.inf).logsumexp(1)], 1)
    tckd = (t_bin.exp() * (t_bin - s_bin)).sum(1)
    rest = ~target
    k = student_logits.shape[1] - 1
    s_rest = F.log_softmax(student_logits[rest].reshape(-1, k) / T, dim=1)
    t_rest = F.log_softmax(teacher_logits[rest].reshape(-1, k) / T, dim=1)
    nckd = (t_rest.exp() * (t_rest - s_rest)).sum(1)
    return tckd, nckd


class DecoupledKD(WeightedTerm, name="dkd"):
    """DKD (Zhao et al., 2022): T^2 * (tckd_weight * TCKD + nckd_weight * NCKD), ramped in linearly.

    The ramp min(epoch / warmup_epochs, 1) is the reference implementation's warm-up.
    """

    uses = frozenset({"alpha", "T"})

    def __init__(self, alpha, T, weight=1.0, tckd_weight=1.0, nckd_weight=8.0, warmup_epochs=20, **options):
        super().__init__(alpha, T, weight, **options)
        self.tckd_weight = self.weight_option("tckd_weight", tckd_weight)
        self.nckd_weight = self.weight_option("nckd_weight", nckd_weight)
        self.warmup_epochs = self.epochs_option("warmup_epochs", warmup_epochs)
        self.ramp = 1.0

    def set_epoch(self, epoch: int) -> None:
        self.ramp = min(epoch / self.warmup_epochs, 1.0) if self.warmup_epochs > 0 else 1.0

    def check_epochs(self, epochs: int) -> None:
        if epochs < self.warmup_epochs:
            log.warning("dkd: train.epochs=%d ends before loss.warmup_epochs=%d, so the DKD term reaches only %d%% of "
                        "its weight, in the last epoch; set loss.warmup_epochs=%d or fewer (0 for no warm-up)",
                        epochs, self.warmup_epochs, 100 * epochs // self.warmup_epochs, epochs)

    def term(self, student, teacher, targets, indices=None):
        tckd, nckd = decoupled_kl(student["logits"], teacher["logits"].detach(), targets, self.T)
        mixed = self.tckd_weight * tckd.mean() + self.nckd_weight * nckd.mean()
        return self.ramp * mixed * self.T**2


def _row_pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    # A floor rather than the reference's "+ eps", so identical rows correlate exactly 1.
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp(min=eps)


class DIST(WeightedTerm, name="dist"):
    """DIST (Huang et al., 2022): T^2 * (inter_weight * inter + intra_weight * intra).

    inter = 1 - mean Pearson correlation of each sample's class probabilities (teacher vs student);
    intra = the same for each class's probabilities across the batch.
    """

    uses = frozenset({"alpha", "T"})

    def __init__(self, alpha, T, weight=1.0, inter_weight=1.0, intra_weight=1.0, **options):
        super().__init__(alpha, T, weight, **options)
        self.inter_weight = self.weight_option("inter_weight", inter_weight)
        self.intra_weight = self.weight_option("intra_weight", intra_weight)

    def term(self, student, teacher, targets, indices=None):
        p_s = F.softmax(student["logits"] / self.T, dim=1)
        p_t = F.softmax(teacher["logits"].detach() / self.T, dim=1)
        inter = 1 - _row_pearson(p_s, p_t).mean()
        intra = 1 - _row_pearson(p_s.t(), p_t.t()).mean()
        return (self.inter_weight * inter + self.intra_weight * intra) * self.T**2


class TeacherFreeKD(WeightedTerm, name="tf_kd"):
    """Tf-KD (Yuan et al., 2020): kd's T^2 * KL against a virtual teacher, no teacher network needed.

    The virtual teacher gives the true class `correct_prob` and spreads the rest evenly (label
    smoothing with a chosen confidence). Its distribution is softened like a real teacher's: its
    log-probabilities are the logits divided by T. With `virtual: false` the stored teacher is used
    instead, which is Tf-KD's self-training variant when that teacher is a pretrained student.
    """

    uses = frozenset({"alpha", "T"})

    needs_teacher = False

    def __init__(self, alpha, T, weight=1.0, correct_prob=0.99, virtual=True, **options):
        super().__init__(alpha, T, weight, **options)
        if not 0 < float(correct_prob) <= 1:
            raise KdError(f"loss.correct_prob must be in (0, 1] (the virtual teacher's probability of the true class), "
                          f"got {correct_prob}")
        self.correct_prob = float(correct_prob)
        self.virtual = bool(virtual)
        self.needs_teacher = not self.virtual

    def check_classes(self, num_classes: int) -> None:
        if self.virtual and self.correct_prob <= 1 / num_classes:
            raise KdError(f"loss.correct_prob={self.correct_prob:g} is not above 1/{num_classes}, so the virtual teacher "
                          f"would rate the true class no higher than the others; choose a value in "
                          f"({1 / num_classes:.3g}, 1] (0.99 is the paper's)")

    def virtual_logits(self, targets: torch.Tensor, num_classes: int, dtype=torch.float32) -> torch.Tensor:
        """Log-probabilities of the virtual teacher (any constant shift gives the same softmax)."""
        rest = (1 - self.correct_prob) / (num_classes - 1)
        logits = torch.full((len(targets), num_classes), math.log(rest) if rest > 0 else -math.inf,
                            dtype=dtype, device=targets.device)
        return logits.scatter(1, targets[:, None], math.log(self.correct_prob))

    def term(self, student, teacher, targets, indices=None):
        logits = student["logits"]
        if self.virtual:
            reference = self.virtual_logits(targets, logits.shape[1], logits.dtype)
        else:
            reference = teacher["logits"].detach()
        return soft_target_kl(logits, reference, self.T)
