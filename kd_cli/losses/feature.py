"""Feature-based methods: the student matches the teacher's intermediate feature maps.

Layers come from each model's `kd_layers["stages"]` (the end of each convolution stage) unless
`loss.student_layers` / `loss.teacher_layers` name others; pairs are matched in order. Each loss is
(1 - alpha) * CE + alpha * weight * term, the term summed over the layer pairs.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.losses.hinton import soft_target_kl
from kd_cli.losses.weighted import WeightedTerm, common_size, flat, flat_size


class FitNets(WeightedTerm, name="fitnets"):
    """FitNets (Romero et al., 2015): a regressor maps the student's guided layer onto the teacher's hint.

    The regressor is one linear convolution whose kernel turns the student's map size into the
    teacher's (a 1x1 convolution when only the channels differ, none when the shapes already agree);
    the hint term is the mean squared error over all elements. With `stage1_epochs: N`, the paper's
    two stages: the first N epochs train on weight * hint alone (the student below the guided layer
    and the regressor), the remaining ones on kd's (1 - alpha) * CE + alpha * T^2 * KL. With 0 (the
    default) the hint term is added to CE for the whole run, as RepDistiller and mdistiller train it.
    """

    layer_kind = "stages"
    max_layers = 1

    def __init__(self, alpha, T, weight=100.0, stage1_epochs=0, **options):
        super().__init__(alpha, T, weight, **options)
        self.stage1_epochs = self.epochs_option("stage1_epochs", stage1_epochs)
        if self.stage1_epochs:  # the second stage is kd's soft targets at T
            self.uses = frozenset({"alpha", "T"})
        self.set_epoch(1)

    def setup(self, student_shapes, teacher_shapes, num_train):
        self.require_maps(student_shapes, teacher_shapes)
        regressors = []
        for i, ((cs, hs, ws), (ct, ht, wt)) in enumerate(zip(student_shapes, teacher_shapes)):
            if (cs, hs, ws) == (ct, ht, wt):
                regressors.append(nn.Identity())
            elif hs < ht or ws < wt:
                raise self.fail(i, f"have {hs}x{ws} and {ht}x{wt} maps; the regressor can only shrink the student's map, "
                                   f"so choose a student layer at least as large as the teacher's hint")
            else:
                regressors.append(nn.Conv2d(cs, ct, kernel_size=(hs - ht + 1, ws - wt + 1)))
        self.regressors = nn.ModuleList(regressors)

    def set_epoch(self, epoch: int) -> None:
        self.hint_only = epoch <= self.stage1_epochs
        self.after_hints = self.stage1_epochs > 0 and not self.hint_only

    def term(self, student, teacher, targets, indices=None):
        pairs = self.feature_pairs(student, teacher)
        return sum(F.mse_loss(reg(s), t) for reg, (s, t) in zip(self.regressors, pairs))

    def forward(self, student, teacher, targets, indices=None, **_):
        if self.hint_only:
            return self.weight * self.term(student, teacher, targets, indices)
        if self.after_hints:
            hard = F.cross_entropy(student["logits"], targets)
            return (1 - self.alpha) * hard + self.alpha * soft_target_kl(student["logits"], teacher["logits"].detach(), self.T)
        return super().forward(student, teacher, targets, indices)


class FeatureMSE(WeightedTerm, name="feature_mse"):
    """The PyTorch KD tutorial's regressor run: a 3x3 convolution (padding 1) widens the student's map
    to the teacher's channels, then mean squared error. Both maps must have the same height and width."""

    layer_kind = "stages"
    max_layers = 1

    def setup(self, student_shapes, teacher_shapes, num_train):
        self.require_maps(student_shapes, teacher_shapes)
        regressors = []
        for i, ((cs, hs, ws), (ct, ht, wt)) in enumerate(zip(student_shapes, teacher_shapes)):
            if (hs, ws) != (ht, wt):
                raise self.fail(i, f"have {hs}x{ws} and {ht}x{wt} maps; feature_mse needs equal sizes "
                                   f"(loss=fitnets regresses a larger student map onto a smaller one)")
            regressors.append(nn.Identity() if cs == ct else nn.Conv2d(cs, ct, kernel_size=3, padding=1))
        self.regressors = nn.ModuleList(regressors)

    def term(self, student, teacher, targets, indices=None):
        pairs = self.feature_pairs(student, teacher)
        return sum(F.mse_loss(reg(s), t) for reg, (s, t) in zip(self.regressors, pairs))


class CosineHidden(WeightedTerm, name="cosine"):
    """The PyTorch KD tutorial's cosine run: 1 - cos between the flattened hidden representations,
    averaged over the batch (CosineEmbeddingLoss with target 1). The teacher's flattened vector is
    average-pooled to the student's length, so it must be at least as long."""

    layer_kind = "stages"
    max_layers = 1

    def setup(self, student_shapes, teacher_shapes, num_train):
        for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
            if flat_size(t) < flat_size(s):
                raise self.fail(i, f"flatten to {flat_size(s)} and {flat_size(t)} values; the teacher's is pooled "
                                   f"down to the student's, so it cannot be shorter")

    def term(self, student, teacher, targets, indices=None):
        total = 0.0
        for s, t in self.feature_pairs(student, teacher):
            s, t = flat(s), flat(t)
            if t.shape[1] != s.shape[1]:
                t = F.adaptive_avg_pool1d(t[:, None], s.shape[1])[:, 0]
            total = total + (1 - F.cosine_similarity(s, t, dim=1)).mean()
        return total


def attention_map(features: torch.Tensor, p: float) -> torch.Tensor:
    """Zagoruyko & Komodakis: the channel mean of |A|^p, flattened and L2-normalised per sample."""
    return F.normalize(flat(features.abs().pow(p).mean(1)), dim=1)


class AttentionTransfer(WeightedTerm, name="at"):
    """AT (Zagoruyko & Komodakis, 2017) over every layer pair: mean squared difference of the
    normalised attention maps, summed over pairs. Maps of different sizes: the larger feature map
    is average-pooled to the smaller's size first (as RepDistiller does). Channel counts may differ."""

    layer_kind = "stages"

    def __init__(self, alpha, T, weight=1000.0, p=2.0, **options):
        super().__init__(alpha, T, weight, **options)
        self.p = float(p)
        # Below 1 the gradient of |A|^p is infinite where a feature is exactly 0, as after every ReLU: NaN.
        if self.p < 1:
            raise ValueError(f"loss.p must be >= 1 (the power of the attention maps; the paper uses 1, 2 and 4), got {p}")

    def setup(self, student_shapes, teacher_shapes, num_train):
        self.require_maps(student_shapes, teacher_shapes)

    def term(self, student, teacher, targets, indices=None):
        total = 0.0
        for s, t in self.feature_pairs(student, teacher):
            s, t = common_size(s, t)
            total = total + (attention_map(s, self.p) - attention_map(t, self.p)).pow(2).mean()
        return total


class NeuronSelectivity(WeightedTerm, name="nst"):
    """NST (Huang & Wang, 2017): squared MMD between the teacher's and the student's channels, each
    channel a distribution over positions (L2-normalised), with the polynomial kernel (x.y + c)^degree.
    Per sample, averaged over the batch, summed over layer pairs; larger maps are pooled as in `at`."""

    layer_kind = "stages"

    def __init__(self, alpha, T, weight=50.0, degree=2, c=0.0, **options):
        super().__init__(alpha, T, weight, **options)
        self.degree, self.c = self.whole_option("degree", degree, 1), float(c)

    def setup(self, student_shapes, teacher_shapes, num_train):
        self.require_maps(student_shapes, teacher_shapes)

    def _kernel_mean(self, a, b):
        return (a @ b.transpose(1, 2) + self.c).pow(self.degree).mean()

    def term(self, student, teacher, targets, indices=None):
        total = 0.0
        for s, t in self.feature_pairs(student, teacher):
            s, t = common_size(s, t)
            s = F.normalize(s.reshape(s.shape[0], s.shape[1], -1), dim=2)
            t = F.normalize(t.reshape(t.shape[0], t.shape[1], -1), dim=2)
            total = total + self._kernel_mean(t, t) + self._kernel_mean(s, s) - 2 * self._kernel_mean(s, t)
        return total
