"""Relation-based methods: the student matches relations (between layers, or between the samples of
a batch) rather than the features themselves, so the two models' widths may differ.

Each loss is (1 - alpha) * CE + alpha * weight * term. The batch-relation methods (rkd, sp, pkt, cc)
depend on the batch size: their reference weights were set at batch sizes 64-128 (docs/methods.md).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.errors import KdError
from kd_cli.losses.weighted import WeightedTerm, common_size, flat


def fsp_matrix(lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """Yim et al.: G[i, j] = mean over positions of lower[i] * upper[j], per sample (B, C_low, C_up)."""
    lower, upper = common_size(lower, upper)
    lower = lower.reshape(lower.shape[0], lower.shape[1], -1)
    upper = upper.reshape(upper.shape[0], upper.shape[1], -1)
    return lower @ upper.transpose(1, 2) / lower.shape[2]


class FSP(WeightedTerm, name="fsp"):
    """FSP (Yim et al., 2017): the flow matrices between consecutive hooked layers of each model,
    matched by mean squared error and summed over the consecutive pairs.

    The paper pairs models of equal widths. Where a student layer's channel count differs from the
    teacher's, a 1x1 convolution (a training-only helper) maps it to the teacher's width first.
    With `stage1_epochs: N`, the paper's procedure: N epochs of weight * FSP alone, then CE alone.
    With 0 (the default) the FSP term is added to CE for the whole run.
    """

    layer_kind = "stages"

    def __init__(self, alpha, T, weight=50.0, stage1_epochs=0, **options):
        super().__init__(alpha, T, weight, **options)
        self.stage1_epochs = self.epochs_option("stage1_epochs", stage1_epochs)
        if self.stage1_epochs:  # FSP alone, then CE alone: alpha weights nothing
            self.uses = frozenset()
        self.set_epoch(1)

    def set_epoch(self, epoch: int) -> None:
        self.fsp_only = epoch <= self.stage1_epochs
        self.labels_only = self.stage1_epochs > 0 and not self.fsp_only

    def forward(self, student, teacher, targets, indices=None, **_):
        if self.fsp_only:
            return self.weight * self.term(student, teacher, targets, indices)
        if self.labels_only:
            return F.cross_entropy(student["logits"], targets)
        return super().forward(student, teacher, targets, indices)

    def setup(self, student_shapes, teacher_shapes, num_train):
        if len(student_shapes) < 2:
            raise KdError(f"loss=fsp needs at least two layers per model (it matches the flow between consecutive "
                          f"ones); got student layers {self.student_layers} and teacher layers {self.teacher_layers}: "
                          f"set loss.student_layers / loss.teacher_layers to two or more stage outputs")
        self.require_maps(student_shapes, teacher_shapes)
        self.adapters = nn.ModuleList(nn.Identity() if s[0] == t[0] else nn.Conv2d(s[0], t[0], kernel_size=1)
                                      for s, t in zip(student_shapes, teacher_shapes))

    def term(self, student, teacher, targets, indices=None):
        pairs = self.feature_pairs(student, teacher)
        s_maps = [adapt(s) for adapt, (s, _) in zip(self.adapters, pairs)]
        t_maps = [t for _, t in pairs]
        total = 0.0
        for i in range(len(pairs) - 1):
            total = total + (fsp_matrix(s_maps[i], s_maps[i + 1]) - fsp_matrix(t_maps[i], t_maps[i + 1])).pow(2).mean()
        return total


def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between rows; the diagonal is exactly 0 and has no gradient."""
    squared = x.pow(2).sum(1)
    d2 = (squared[:, None] + squared[None, :] - 2 * x @ x.t()).clamp(min=1e-12)
    off_diagonal = ~torch.eye(len(x), dtype=torch.bool, device=x.device)
    return torch.where(off_diagonal, d2.sqrt(), torch.zeros_like(d2))


def angles(x: torch.Tensor) -> torch.Tensor:
    """cos of the angle at vertex i between samples j and k, for every (i, j, k)."""
    directions = F.normalize(x[None, :, :] - x[:, None, :], dim=2)
    return directions @ directions.transpose(1, 2)


class RelationalKD(WeightedTerm, name="rkd"):
    """RKD (Park et al., 2019) on the embeddings: distance_weight * smooth-L1 between the pairwise
    distance matrices (each divided by its mean off-diagonal distance) + angle_weight * smooth-L1
    between the triplet angle tensors. Both averaged over all entries."""

    layer_kind = "embedding"
    max_layers = 1

    def __init__(self, alpha, T, weight=1.0, distance_weight=25.0, angle_weight=50.0, **options):
        super().__init__(alpha, T, weight, **options)
        self.distance_weight = self.weight_option("distance_weight", distance_weight)
        self.angle_weight = self.weight_option("angle_weight", angle_weight)

    @staticmethod
    def _normalised_distances(x):
        d = pairwise_distances(x)
        n = len(x)
        return d / (d.sum() / max(n * (n - 1), 1)).clamp(min=1e-12)

    def term(self, student, teacher, targets, indices=None):
        total = 0.0
        for s, t in self.feature_pairs(student, teacher):
            s, t = flat(s), flat(t)
            distance = F.smooth_l1_loss(self._normalised_distances(s), self._normalised_distances(t))
            angle = F.smooth_l1_loss(angles(s), angles(t))
            total = total + self.distance_weight * distance + self.angle_weight * angle
        return total


class SimilarityPreserving(WeightedTerm, name="sp"):
    """SP (Tung & Mori, 2019): the batch's Gram matrices of the flattened features, rows L2-normalised,
    squared Frobenius distance divided by batch_size^2."""

    layer_kind = "stages"
    max_layers = 1

    def __init__(self, alpha, T, weight=3000.0, **options):
        super().__init__(alpha, T, weight, **options)

    @staticmethod
    def _similarity(x):
        x = flat(x)
        return F.normalize(x @ x.t(), dim=1)

    def term(self, student, teacher, targets, indices=None):
        total = 0.0
        for s, t in self.feature_pairs(student, teacher):
            total = total + (self._similarity(s) - self._similarity(t)).pow(2).sum() / len(s) ** 2
        return total


class ProbabilisticKT(WeightedTerm, name="pkt"):
    """PKT (Passalis & Tefas, 2018): cosine similarities of the embeddings, shifted to [0, 1] and
    normalised per row into conditional probabilities; KL(teacher || student) averaged over the
    batch_size^2 entries (RepDistiller's reduction, for which its weight 30000 was set)."""

    layer_kind = "embedding"
    max_layers = 1
    eps = 1e-7

    def __init__(self, alpha, T, weight=30000.0, **options):
        super().__init__(alpha, T, weight, **options)

    @staticmethod
    def _conditional(x):
        x = F.normalize(flat(x), dim=1)
        similarity = (x @ x.t() + 1) / 2
        return similarity / similarity.sum(1, keepdim=True)

    def term(self, student, teacher, targets, indices=None):
        total = 0.0
        for s, t in self.feature_pairs(student, teacher):
            p_s, p_t = self._conditional(s), self._conditional(t)
            total = total + (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()
        return total


class CorrelationCongruence(WeightedTerm, name="cc"):
    """CC (Peng et al., 2019): the batch's correlation matrices under a Gaussian RBF kernel on the
    L2-normalised embeddings, exp(-gamma * |x - y|^2) = exp(-2 gamma) * exp(2 gamma x.y), with the
    second factor replaced by its Taylor series up to `order`; mean squared difference (1/n^2)."""

    layer_kind = "embedding"
    max_layers = 1

    def __init__(self, alpha, T, weight=0.02, gamma=0.4, order=2, **options):
        super().__init__(alpha, T, weight, **options)
        self.gamma, self.order = float(gamma), self.whole_option("order", order, 1)  # order 0: a constant term
        if self.gamma <= 0:
            raise ValueError(f"loss.gamma must be > 0 (the kernel's width; at 0 the correlations are constant), got {gamma}")

    def correlation(self, x):
        x = F.normalize(flat(x), dim=1)
        cos = x @ x.t()
        series = sum((2 * self.gamma) ** p / math.factorial(p) * cos.pow(p) for p in range(self.order + 1))
        return math.exp(-2 * self.gamma) * series

    def term(self, student, teacher, targets, indices=None):
        total = 0.0
        for s, t in self.feature_pairs(student, teacher):
            total = total + F.mse_loss(self.correlation(s), self.correlation(t))
        return total
