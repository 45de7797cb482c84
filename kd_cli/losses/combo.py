"""Weighted sums of methods: `loss=combo loss.terms={kd:1.0,at:1000}` trains with CE + KD + AT.

The loss is (1 - alpha) * CE + alpha * sum_i w_i * term_i, each term exactly as its own `loss=NAME`
computes it, so `terms={kd:1}` is `loss=kd` and `terms={at:1000}` is `loss=at`. A term's value in
`terms` is its weight, or a mapping of its options: `terms={kd:1,at:{weight:1000,p:2}}`; options
left out take the method's defaults (those of conf/loss/NAME.yaml).
"""

from collections.abc import Mapping

from omegaconf import DictConfig, OmegaConf
from torch import nn

from kd_cli.errors import KdError
from kd_cli.losses import LOSSES
from kd_cli.losses.hinton import HintonKD, soft_target_kl
from kd_cli.losses.weighted import WeightedTerm


def _combinable() -> list[str]:
    return sorted(name for name, cls in LOSSES.items()
                  if (issubclass(cls, WeightedTerm) and cls is not Combo) or cls is HintonKD)


class Combo(WeightedTerm, name="combo"):
    """(1 - alpha) * CE + alpha * sum of weighted terms of other methods."""

    def __init__(self, alpha, T, terms=None, **options):
        super().__init__(alpha, T, 1.0, **options)
        if isinstance(terms, DictConfig):
            terms = OmegaConf.to_container(terms, resolve=True)
        if not isinstance(terms, Mapping) or not terms:
            raise KdError(f"loss=combo needs loss.terms, a mapping of method to weight such as "
                          f"'loss.terms={{kd:1.0,at:1000}}' (quoted in a shell); methods: {', '.join(_combinable())}")
        built = {}
        for name, spec in terms.items():
            if name not in _combinable():
                raise KdError(f"loss.terms: '{name}' cannot be a combo term; choose from: {', '.join(_combinable())} "
                              f"(CE is always included, weighted 1 - alpha)")
            options = dict(spec) if isinstance(spec, Mapping) else {"weight": spec}
            built[name] = self._build(name, options)
        self.terms = nn.ModuleDict(built)
        self.uses = self.uses.union(*(term.uses for term in built.values()))
        self.needs_teacher = any(term.needs_teacher for term in self.terms.values())
        self.regresses_logits = any(term.regresses_logits for term in self.terms.values())

    @property
    def hooks_layers(self) -> bool:
        return any(term.hooks_layers for term in self.terms.values())

    @classmethod
    def option_names(cls) -> list[str]:
        return ["terms"]

    @classmethod
    def check_options(cls, options) -> None:
        options = set(options)
        if options & {"student_layers", "teacher_layers"}:
            raise KdError("loss=combo takes layers per term, e.g. 'loss.terms={at:{weight:1000,student_layers:[...]}}'")
        super().check_options(options)

    def _build(self, name: str, options: dict) -> nn.Module:
        if "weight" in options:
            try:
                options["weight"] = float(options["weight"])
            except (TypeError, ValueError):
                raise KdError(f"loss.terms.{name}: the weight must be a number, got {options['weight']!r}") from None
            if options["weight"] < 0:
                raise KdError(f"loss.terms.{name}: the weight must be >= 0, got {options['weight']:g}")
        if LOSSES[name] is HintonKD:
            if set(options) - {"weight"}:
                raise KdError("loss.terms.kd takes only a weight; its temperature is the top-level T")
            term = HintonKD(alpha=self.alpha, T=self.T)
            term.weight = options.get("weight", 1.0)
            return term
        if int(options.get("stage1_epochs", 0)) > 0:
            raise KdError(f"loss.terms.{name}: stage1_epochs applies to loss={name} on its own, not inside a combo")
        try:
            return LOSSES[name](alpha=self.alpha, T=self.T, **options)
        except KdError as e:
            raise KdError(f"loss.terms.{name}: {e.reason}") from None
        except ValueError as e:  # an out-of-range option, e.g. loss.terms.at.p=0
            raise KdError(f"loss.terms.{name}: {e}") from None

    def attach(self, student, teacher, example, num_train) -> None:
        for term in self.terms.values():
            term.attach(student, teacher, example, num_train)
        # The engine hooks the union of the terms' layers once; each term reads its own keys.
        self.student_layers = list(dict.fromkeys(p for term in self.terms.values() for p in term.student_layers))
        self.teacher_layers = list(dict.fromkeys(p for term in self.terms.values() for p in term.teacher_layers))

    def set_epoch(self, epoch: int) -> None:
        for term in self.terms.values():
            term.set_epoch(epoch)

    def check_epochs(self, epochs: int) -> None:
        for term in self.terms.values():
            term.check_epochs(epochs)

    def check_classes(self, num_classes: int) -> None:
        for term in self.terms.values():
            term.check_classes(num_classes)

    def term(self, student, teacher, targets, indices=None):
        total = 0.0
        for term in self.terms.values():
            if isinstance(term, HintonKD):
                value = soft_target_kl(student["logits"], teacher["logits"].detach(), term.T)
            else:
                value = term.term(student, teacher, targets, indices)
            total = total + term.weight * value
        return total
