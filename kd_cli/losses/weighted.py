"""The one way every kd method (except `kd` and `ce`) mixes with the labels, and shared shape helpers.

A method defines `term()`, its distillation term without any weight; the loss is then

    (1 - alpha) * CE(student, y) + alpha * weight * term

the same form as `kd`, whose term is T^2 * KL. A paper that trains with CE + beta * term is
reproduced, up to an overall factor 1/2, by alpha=0.5 and loss.weight=beta.
"""

import math

import torch
import torch.nn.functional as F

from kd_cli.errors import KdError
from kd_cli.losses import DistillationLoss


class WeightedTerm(DistillationLoss):
    """(1 - alpha) * CE + alpha * weight * term(); subclasses implement term()."""

    uses = frozenset({"alpha"})  # methods that soften probabilities add T

    def __init__(self, alpha: float, T: float, weight: float = 1.0, **options):
        super().__init__(**options)
        self.alpha, self.T, self.weight = float(alpha), float(T), self.weight_option("weight", weight)

    @staticmethod
    def weight_option(name: str, value) -> float:
        """A loss.* weight: a negative one would maximise its term."""
        if float(value) < 0:
            raise ValueError(f"loss.{name} must be >= 0 (a negative weight maximises its term), got {value}")
        return float(value)

    @staticmethod
    def whole_option(name: str, value, minimum: int, unit: str = "") -> int:
        """A loss.* option that counts something (a degree, an order, a dimension): refused, not truncated."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < minimum:
            raise ValueError(f"loss.{name} must be a whole number{unit} >= {minimum}, got {value}")
        return int(value)

    @classmethod
    def epochs_option(cls, name: str, value) -> int:
        """A count of epochs from a loss.* option (stage1_epochs, warmup_epochs)."""
        return cls.whole_option(name, value, 0, " of epochs")

    def term(self, student: dict, teacher: dict | None, targets: torch.Tensor, indices=None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, student, teacher, targets, indices=None, **_):
        hard = F.cross_entropy(student["logits"], targets)
        return (1 - self.alpha) * hard + self.alpha * self.weight * self.term(student, teacher, targets, indices)

    def feature_pairs(self, student: dict, teacher: dict) -> list[tuple[torch.Tensor, torch.Tensor]]:
        # Detached even though the engine already hands over no-grad teacher outputs: a loss used
        # elsewhere (tests, notebooks) must not train the teacher either.
        return [(s, t.detach()) for s, t in self.pairs(student, teacher)]

    def fail(self, index: int, problem: str) -> KdError:
        """A one-line error naming the layer pair at `index`."""
        return KdError(f"loss={self.loss_name()}: student layer '{self.student_layers[index]}' and teacher layer "
                       f"'{self.teacher_layers[index]}' {problem}")

    def require_maps(self, student_shapes, teacher_shapes) -> None:
        """Feature-map methods need (C, H, W) outputs at every hooked layer."""
        for i, (s, t) in enumerate(zip(student_shapes, teacher_shapes)):
            if len(s) != 3 or len(t) != 3:
                raise self.fail(i, f"give outputs of shape {tuple(s)} and {tuple(t)}; loss={self.loss_name()} needs "
                                   f"feature maps (channels, height, width): set loss.student_layers / loss.teacher_layers "
                                   f"to convolutional layers")


def flat(x: torch.Tensor) -> torch.Tensor:
    """One row per sample; reshape rather than view because channels_last maps are not contiguous."""
    return x.reshape(x.shape[0], -1)


def flat_size(shape: tuple) -> int:
    return math.prod(shape)


def common_size(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Average-pool the larger of two feature maps to the smaller one's height and width."""
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    if tuple(a.shape[-2:]) != size:
        a = F.adaptive_avg_pool2d(a, size)
    if tuple(b.shape[-2:]) != size:
        b = F.adaptive_avg_pool2d(b, size)
    return a, b

