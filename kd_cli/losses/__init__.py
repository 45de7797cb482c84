"""Distillation losses, selected by `loss=NAME`.

Every loss is called as `loss(student, teacher, targets, indices=...)`: `student` and `teacher` are
dicts of outputs, "logits" plus the features hooked at the loss's layer paths (keyed by path);
`teacher` is None when the loss needs none; `indices` are the batch's positions in the training
set (for methods with a per-sample memory); `inputs` is the normalised batch (for schemes whose
helper modules see the images themselves: mutual-learning peers). Adding a method is one module
with one class, one yaml in conf/loss/, one test.
"""

import difflib
import inspect

import torch
from torch import nn

from kd_cli.errors import KdError
from kd_cli.features import FeatureTaps, check_paths, default_layers

LOSSES: dict[str, type["DistillationLoss"]] = {}


class DistillationLoss(nn.Module):
    """Base class: subclasses register with `name=` and implement forward().

    Class attributes:
      needs_teacher  whether the teacher runs at all;
      regresses_logits  whether it reads the teacher's logits as values, not only the probabilities
                     softmax gives of them (which a per-sample shift leaves unchanged);
      layer_kind     None for logit-only methods, else which default layers of each model to hook:
                     "stages" (feature maps at the end of each stage) or "embedding" (the vector the
                     classifier head sees). `loss.student_layers` / `loss.teacher_layers` override them.
      max_layers     how many layer pairs the method uses (the deepest ones), None for all.
      uses           which of the top-level `alpha` and `T` its value depends on; the command line
                     warns when one it ignores is set (a T sweep of `loss=at` trains one student N times).
    Helper modules a method needs (regressors, embedding heads, memories) are built in `setup()` as
    submodules: they train with the student, are checkpointed with it, and never count as part of it.
    """

    needs_teacher = True
    regresses_logits = False
    layer_kind: str | None = None
    max_layers: int | None = None
    uses: frozenset[str] = frozenset()

    def __init_subclass__(cls, name: str | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if name:
            LOSSES[name] = cls

    def __init__(self, student_layers=None, teacher_layers=None, **options):
        # What reaches here no subclass took: build_loss hands every loss the top-level alpha and T,
        # and anything else is an option this method lacks (a misspelt `loss.wieght=`), never ignored;
        # nor are layer paths given to a method that hooks no layers.
        given_layers = [k for k, v in (("student_layers", student_layers), ("teacher_layers", teacher_layers)) if v]
        self.check_options([*options, *given_layers])
        super().__init__()
        # One path may come without brackets (loss.student_layers=features.2): a list of one, not of its letters.
        self.student_layers: list[str] = [student_layers] if isinstance(student_layers, str) else list(student_layers or [])
        self.teacher_layers: list[str] = [teacher_layers] if isinstance(teacher_layers, str) else list(teacher_layers or [])

    @property
    def hooks_layers(self) -> bool:
        """Whether the method reads intermediate layers (known before attach(), which resolves them)."""
        return bool(self.layer_kind or self.student_layers or self.teacher_layers)

    @classmethod
    def loss_name(cls) -> str:
        return next((name for name, klass in LOSSES.items() if klass is cls), cls.__name__)

    @classmethod
    def option_defaults(cls) -> dict:
        """The `loss.*` keys this method takes, each with its default: its constructors' keywords (the layer
        paths only where it hooks layers)."""
        defaults = {}
        for klass in reversed(cls.__mro__):  # a subclass's default over its base's
            if "__init__" in vars(klass) and issubclass(klass, DistillationLoss):
                defaults |= {p.name: p.default for p in inspect.signature(klass.__init__).parameters.values()
                             if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        skipped = {"self", "alpha", "T"} | (set() if cls.layer_kind else {"student_layers", "teacher_layers"})
        return {name: default for name, default in defaults.items() if name not in skipped}

    @classmethod
    def option_names(cls) -> list[str]:
        return sorted(cls.option_defaults())

    @classmethod
    def check_options(cls, options) -> None:
        known = cls.option_names()
        unknown = sorted(set(options) - set(known) - {"alpha", "T"})
        if unknown:
            close = difflib.get_close_matches(unknown[0], known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            listed = f"its options are: {', '.join(known)}" if known else "it takes no loss.* options"
            raise KdError(f"loss={cls.loss_name()} has no option '{unknown[0]}'{hint}; {listed}")

    def attach(self, student: nn.Module, teacher: nn.Module | None, example: torch.Tensor, num_train: int) -> None:
        """Resolve the layer paths, check they exist, and build helper modules for their shapes."""
        if self.layer_kind:
            # A misspelt path first: it, not a layer count it leads to, is what needs fixing.
            for role, model, given in (("student", student, self.student_layers), ("teacher", teacher, self.teacher_layers)):
                if given:
                    check_paths(model, given, role)
            defaulted = None  # the side whose layers are its defaults, when only the other was given
            if not self.student_layers and not self.teacher_layers:
                # Models with different stage counts (ResNet-18's 4, light6's 3): pair the deepest stages
                # of each, which on CIFAR also have equal map sizes (16, 8, 4).
                student_default = default_layers(student, self.layer_kind)
                teacher_default = default_layers(teacher, self.layer_kind)
                count = min(len(student_default), len(teacher_default), self.max_layers or len(student_default))
                self.student_layers, self.teacher_layers = student_default[-count:], teacher_default[-count:]
            elif not (self.student_layers and self.teacher_layers):  # one side given: the other side's defaults
                defaulted = "student" if not self.student_layers else "teacher"
                self.student_layers = self.student_layers or self._deepest(default_layers(student, self.layer_kind))
                self.teacher_layers = self.teacher_layers or self._deepest(default_layers(teacher, self.layer_kind))
            if len(self.student_layers) != len(self.teacher_layers):
                counts = {role: f"{len(layers)} layer{'s' * (len(layers) != 1)}"
                          for role, layers in (("student", self.student_layers), ("teacher", self.teacher_layers))}
                if defaulted:
                    counts[defaulted] += f" (its default: {', '.join(getattr(self, f'{defaulted}_layers'))})"
                raise KdError(f"loss.student_layers has {counts['student']} and loss.teacher_layers {counts['teacher']}; "
                              f"give the same number (they are matched in order)")
        shapes = {}
        for role, model, paths in (("student", student, self.student_layers), ("teacher", teacher, self.teacher_layers)):
            if not paths:
                continue
            taps = FeatureTaps(model, paths, role)
            was_training = model.training
            model.eval()
            with torch.no_grad():
                model(example)
            model.train(was_training)
            taken = taps.pop()  # refuses a path a later layer overwrites in place, before anything trains
            shapes[role] = [tuple(taken[p].shape[1:]) for p in paths]
            taps.remove()
        self.setup(shapes.get("student", []), shapes.get("teacher", []), num_train)

    def _deepest(self, layers: list[str]) -> list[str]:
        return layers[-self.max_layers:] if self.max_layers else layers

    def setup(self, student_shapes: list[tuple], teacher_shapes: list[tuple], num_train: int) -> None:
        """Build helper modules; shapes exclude the batch dimension."""

    def set_epoch(self, epoch: int) -> None:
        """Called before each epoch (1-based), for methods with stages."""

    def check_epochs(self, epochs: int) -> None:
        """Called once before training: warn when a run of `epochs` is too short for the method's schedule."""

    def check_classes(self, num_classes: int) -> None:
        """Called by config.validate: refuse options that make no sense for the dataset's class count."""

    def pairs(self, student: dict, teacher: dict):
        """The hooked (student, teacher) feature pairs, in layer order."""
        return [(student[s], teacher[t]) for s, t in zip(self.student_layers, self.teacher_layers)]


def build_loss(cfg, alpha: float | None = None, T: float | None = None) -> DistillationLoss:
    """The loss of `cfg.loss`, given the top-level `alpha` and `T` (or these) where it takes them.

    Cheap (helper modules are built later, in attach), so config.validate builds it once to have
    every option checked before anything trains.
    """
    options = {k: v for k, v in cfg.loss.items() if k != "name"}
    name = cfg.loss.name
    if name not in LOSSES:
        raise KdError(f"unknown loss '{name}'; choose one of: {', '.join(sorted(LOSSES))}")
    for key in ("alpha", "T"):  # `+loss.T=3`: every loss is handed the top-level one
        if key in options:
            raise KdError(f"loss.{key} is no option of a loss: {key} is a setting of its own; write {key}={options[key]}")
    for key, default in LOSSES[name].option_defaults().items():
        if isinstance(default, bool) and not isinstance(options.get(key, default), bool):  # 'false' is a true string
            raise KdError(f"loss.{key} must be true or false, got {options[key]!r}")
    try:
        return LOSSES[name](alpha=cfg.get("alpha") if alpha is None else alpha, T=cfg.get("T") if T is None else T, **options)
    except (TypeError, ValueError) as e:  # a value of the wrong type, e.g. loss.weight=abc
        raise KdError(f"loss={name}: {e}; check the loss.* values (`kd distill loss={name} --cfg job` lists them)") from None


from kd_cli.losses import combo, contrastive, feature, hinton, relation, response  # noqa: E402,F401  (registers the losses)
