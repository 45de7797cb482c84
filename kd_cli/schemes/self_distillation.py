"""`self`: be your own teacher (Zhang et al., 2019).

The student gets an auxiliary exit after each stage but the last: a 1x1 convolution to the
deepest stage's width, pooling, and a linear classifier. The final exit (the student's own head)
teaches the shallow ones: each exit learns from the labels, from the final exit's soft targets
(KL at temperature T) and from the deepest stage's pooled features (L2). The deployed model is the
backbone with its final exit; the exits are reported as an early-exit student, each with the
accuracy and the cost of running the backbone only up to it.
"""

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.engine import evaluate
from kd_cli.errors import KdError
from kd_cli.features import FeatureTaps, check_paths, default_layers
from kd_cli.losses import DistillationLoss
from kd_cli.losses.hinton import soft_target_kl
from kd_cli.measure import count_params, size_mb
from kd_cli.models import ImageSpec, model_label
from kd_cli.schemes import scheme


class ExitHead(nn.Module):
    """Stage features -> (embedding of the deepest stage's width, class logits)."""

    def __init__(self, channels: int, width: int, num_classes: int):
        super().__init__()
        self.bottleneck = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width),
                                        nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, features):
        embedding = self.bottleneck(features)
        return embedding, self.classifier(embedding)


class SelfDistillation(DistillationLoss):
    """CE(final) + sum over exits of (1 - alpha) CE + alpha T^2 KL(final || exit) + w * L2(embedding, deepest)."""

    needs_teacher = False

    def __init__(self, alpha: float, T: float, feature_weight: float, stages: list[str], num_classes: int):
        super().__init__()
        self.student_layers = list(stages)  # the exits' inputs: set here, as no config names them
        self.alpha, self.T, self.feature_weight, self.num_classes = float(alpha), float(T), float(feature_weight), num_classes

    def setup(self, student_shapes, teacher_shapes, num_train):
        if any(len(shape) != 3 for shape in student_shapes):
            raise KdError(f"scheme=self needs convolutional feature maps at scheme.exits; got shapes {student_shapes}")
        width = student_shapes[-1][0]
        self.heads = nn.ModuleList(ExitHead(shape[0], width, self.num_classes) for shape in student_shapes[:-1])

    def forward(self, student, teacher, targets, **_):
        final = student["logits"]
        deepest = student[self.student_layers[-1]].float().mean(dim=(2, 3)).detach()
        loss = F.cross_entropy(final, targets)
        for head, path in zip(self.heads, self.student_layers):
            embedding, logits = head(student[path])
            loss = loss + ((1 - self.alpha) * F.cross_entropy(logits, targets)
                           + self.alpha * soft_target_kl(logits, final.detach(), self.T)
                           + self.feature_weight * F.mse_loss(embedding.float(), deepest))
        return loss


class _Exit(Exception):
    def __init__(self, features):
        self.features = features


class EarlyExit(nn.Module):
    """The backbone run up to `path`, then `head`: what an early-exit deployment computes."""

    def __init__(self, backbone: nn.Module, path: str, head: ExitHead):
        super().__init__()
        self.backbone, self.path, self.head = backbone, path, head

    def forward(self, x):
        def stop(features):
            raise _Exit(features)

        name, _, side = self.path.partition(":")
        layer = self.backbone.get_submodule(name)
        if side == "in":  # the exit reads the layer's input, so the layer itself never runs
            handle = layer.register_forward_pre_hook(lambda module, inputs: stop(inputs[0]))
        else:
            handle = layer.register_forward_hook(lambda module, inputs, output: stop(output))
        try:
            self.backbone(x)
        except _Exit as reached:
            return self.head(reached.features)[1]
        finally:
            handle.remove()
        raise KdError(f"the backbone never ran layer '{self.path}'")

    @torch.no_grad()
    def used_size(self, example: torch.Tensor) -> tuple[int, float]:
        """(parameters, MiB as fp32) of the modules this exit actually runs."""
        ran: dict[int, nn.Module] = {}

        def record(module, inputs, output):  # returns None: a hook's return value would replace the output
            ran[id(module)] = module

        hooks = [m.register_forward_hook(record) for m in self.backbone.modules() if not list(m.children())]
        was_training = self.training
        self.eval()
        try:
            self(example)
        finally:
            for hook in hooks:
                hook.remove()
            self.train(was_training)
        used = nn.ModuleList([*ran.values(), self.head])
        return count_params(used), size_mb(used)


def exits_of(cfg, student: nn.Module) -> list[str]:
    """The layers of `student` that scheme=self puts exits after: `scheme.exits`, or its own stages.

    Traced with one image, so that a bad list is refused before anything trains: each path must give a
    feature map, and the paths must come in the order the student runs them, the deepest last.
    """
    stages = list(cfg.scheme.exits) if cfg.scheme.exits else default_layers(student, "stages")
    check_paths(student, stages, "student")
    if len(stages) < 2:
        given = f"scheme.exits names {len(stages)}" if cfg.scheme.exits else f"{model_label(cfg.student)} has {stages}"
        raise KdError(f"scheme=self needs at least two stages to put exits after; {given}; "
                      f"{'name' if cfg.scheme.exits else 'choose a deeper student or set'} scheme.exits=[PATH,...] "
                      f"with two or more (the last is the deepest)")
    twice = next((path for path in stages if stages.count(path) > 1), None)
    if twice:
        raise KdError(f"scheme.exits names '{twice}' twice; give each layer once")
    spec = ImageSpec.of(cfg.dataset)
    taps = FeatureTaps(student, stages, "student")
    try:
        with torch.no_grad():
            student.eval()(torch.zeros(1, spec.channels, spec.size, spec.size))
        taken = taps.pop()
    finally:
        taps.remove()
    flat = next((path for path, features in taken.items() if features.dim() != 4), None)
    if flat:
        raise KdError(f"scheme=self puts its exits after feature maps (channels, height, width), but the student's "
                      f"layer '{flat}' gives shape {tuple(taken[flat].shape[1:])}; choose convolutional layers for scheme.exits")
    if list(taken) != stages:
        raise KdError(f"scheme.exits must list layers in the order the student runs them, the deepest last: "
                      f"scheme.exits=[{','.join(taken)}]")
    return stages


@scheme("self")
def self_distillation(run):
    cfg = run.cfg  # config.validate has checked the loss and the exits
    stages = exits_of(cfg, run.new_model(cfg.student))
    loss_fn = SelfDistillation(cfg.alpha, cfg.T, cfg.scheme.feature_weight, stages, run.data.spec.num_classes)
    rows, histories = [], {}
    run.scratch_row(rows, histories)
    student, meta, result = run.distill_student(None, loss_fn, histories, loss="self", exits=stages)
    label = model_label(cfg.student)
    student.eval()
    for number, (path, head) in enumerate(zip(stages, loss_fn.heads), 1):
        early = EarlyExit(student, path, head).eval()
        metrics = {"accuracy": evaluate(early, run.data)}
        params, size = early.used_size(run.example())
        row = run.row(f"exit_{number}", early, f"{label}@{path}", {"metrics": metrics}, None, **run.distill_columns(),
                      taught_by="final exit")
        rows.append(row | {"params": params, "size_mb": round(size, 4)})
    rows.append(run.student_kd_row(student, meta, loss_fn))
    return rows, histories, result.val_accuracy
