"""Training schemes, selected by `scheme=NAME`: who teaches whom, and in which order.

A scheme is a function of a started `Run` that trains what it needs and returns the results
table's rows, the training histories, and the objective a sweeper maximises (the deployed
student's validation accuracy). Adding a scheme is one module with one function, one yaml in
conf/scheme/, one test.
"""

from typing import Callable

from omegaconf import OmegaConf

from kd_cli.errors import KdError

SCHEMES: dict[str, Callable] = {}


def scheme(name: str):
    def add(function):
        SCHEMES[name] = function
        return function

    return add


def run_scheme(run):
    name = run.cfg.scheme.name
    if name not in SCHEMES:
        raise KdError(f"unknown scheme '{name}'; choose one of: {', '.join(sorted(SCHEMES))}")
    return SCHEMES[name](run)


def model_config(name: str):
    """The config of catalogue model `name`, as `teacher=NAME` would compose it (config.validate
    has already checked every name a scheme lists)."""
    return OmegaConf.create({"arch": name, "checkpoint": None})


def logit_loss_only(loss_fn, cfg) -> None:
    """Schemes that mix several models' logits cannot pair their intermediate features."""
    if loss_fn.hooks_layers or list(loss_fn.parameters()) or not loss_fn.needs_teacher:
        raise KdError(f"scheme={cfg.scheme.name} combines logits, so it takes a loss on the teacher's logits: "
                      f"kd, soft_ce, {'' if cfg.scheme.name == 'multi_teacher' else 'logits_mse, '}dkd or dist "
                      f"(not loss={cfg.loss.name})")
    # The ensemble's "logits" are T * log of its averaged probabilities: the probabilities are exact, but
    # as values they are shifted per sample, and by an amount that depends on T.
    if cfg.scheme.name == "multi_teacher" and loss_fn.regresses_logits:
        raise KdError(f"scheme=multi_teacher averages its teachers' probabilities, and a mixture has no logits for "
                      f"loss={cfg.loss.name} to regress (it would fit a shift that depends on T); use kd, soft_ce, "
                      f"dkd or dist")


# Importing the modules fills SCHEMES.
from kd_cli.schemes import chain, ensemble, mutual, self_distillation  # noqa: E402,F401
