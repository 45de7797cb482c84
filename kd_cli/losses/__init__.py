"""Distillation losses, selected by `loss=NAME`.

Every loss is called as `loss(student, teacher, targets)`, where `student` and `teacher` are dicts
of model outputs ("logits", plus any hooked features) and `teacher` is None when no teacher is used.
Adding a method is one module with one registered class, one yaml in conf/loss/, one test.
"""

from torch import nn

from kd_cli.errors import KdError

LOSSES: dict[str, type["DistillationLoss"]] = {}


class DistillationLoss(nn.Module):
    """Base class. Subclasses set `needs_teacher` and implement forward(student, teacher, targets)."""

    needs_teacher = True

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name:
            LOSSES[name] = cls


def build_loss(cfg) -> DistillationLoss:
    """The loss of `cfg.loss`, given the top-level `alpha` and `T` where it takes them."""
    options = {k: v for k, v in cfg.loss.items() if k != "name"}
    name = cfg.loss.name
    if name not in LOSSES:
        raise KdError(f"unknown loss '{name}'; choose one of: {', '.join(sorted(LOSSES))}")
    return LOSSES[name](alpha=cfg.get("alpha"), T=cfg.get("T"), **options)


from kd_cli.losses import hinton  # noqa: E402,F401  (registers the losses)
