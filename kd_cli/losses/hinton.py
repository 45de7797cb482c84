"""Labels only (`ce`) and Hinton et al.'s soft-target distillation (`kd`)."""

import torch.nn.functional as F

from kd_cli.losses import DistillationLoss


class CrossEntropy(DistillationLoss, name="ce"):
    """Cross-entropy with the labels: the no-KD baseline."""

    needs_teacher = False

    def forward(self, student, teacher, targets, **_):
        return F.cross_entropy(student["logits"], targets)


def soft_target_kl(student_logits, teacher_logits, T: float):
    """KL(p_teacher^T || p_student^T) averaged over the batch, times T^2.

    F.kl_div wants the student's log-probabilities as input and the teacher's probabilities as
    target; `batchmean` divides by the batch size, which is the mathematical KL (`mean` would also
    divide by the class count). T^2 keeps the gradient scale independent of T (Hinton et al.).
    """
    log_p_student = F.log_softmax(student_logits / T, dim=1)
    p_teacher = F.softmax(teacher_logits / T, dim=1)
    return F.kl_div(log_p_student, p_teacher, reduction="batchmean") * T * T


class HintonKD(DistillationLoss, name="kd"):
    """(1 - alpha) * CE(student, y) + alpha * T^2 * KL(p_teacher^T || p_student^T)."""

    uses = frozenset({"alpha", "T"})

    def __init__(self, alpha: float, T: float, **options):
        super().__init__(**options)
        self.alpha, self.T = float(alpha), float(T)

    def forward(self, student, teacher, targets, **_):
        hard = F.cross_entropy(student["logits"], targets)
        # Detached, as in every method: a loss used outside the engine (tests, notebooks) must not train the teacher.
        soft = soft_target_kl(student["logits"], teacher["logits"].detach(), self.T)
        return (1 - self.alpha) * hard + self.alpha * soft
