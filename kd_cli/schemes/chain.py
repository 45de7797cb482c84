"""Chains of teachers: `offline` (teacher -> student), `ta` (teacher -> assistants -> student) and
`born_again` (the student's architecture teaching itself over generations).

Every link is offline distillation from the previous model. The models in the middle of a chain
are kept in the model store under a key that names their teacher's weights, the loss, alpha and T.
Those links use `scheme.link_alpha` / `link_T` (the run's alpha and T when null): set them, and a
sweep over alpha and T of the last link trains the earlier links once. The final student goes to
the run folder.
"""

import itertools
import logging

import torch
from omegaconf import OmegaConf

from kd_cli.config import settings_read
from kd_cli.losses import build_loss
from kd_cli.models import build_model, model_label
from kd_cli.schemes import model_config, scheme
from kd_cli.store import checksum, store_path, trained_with

log = logging.getLogger(__name__)


@scheme("offline")
def offline(run):
    if not build_loss(run.cfg).needs_teacher:  # loss=ce, or tf_kd's virtual teacher: no teacher to train or load
        rows, histories = [], {}
        run.scratch_row(rows, histories)
        return _student_rows(run, None, rows, histories)
    return distill_chain(run, run.teacher(), run.cfg.teacher, links=[], role="")


def chain_configs(cfg) -> list:
    """The model configs of the run's chain, its first teacher first and the student last."""
    name = cfg.scheme.name
    if name == "ta":
        return [cfg.teacher, *(model_config(assistant) for assistant in cfg.scheme.assistants), cfg.student]
    if name == "born_again":
        first = cfg.student if cfg.scheme.start == "scratch" else cfg.teacher
        return [first, *[cfg.student] * cfg.scheme.generations]
    return [cfg.teacher, cfg.student]


@scheme("ta")
def teacher_assistant(run):
    """Mirzadeh et al. (2020): teacher -> assistant(s) -> student, each link offline KD."""
    models = chain_configs(run.cfg)
    _warn_where_a_link_does_not_shrink(models, run.data.spec)
    return distill_chain(run, run.teacher(), models[0], models[1:-1], role="assistant")


def _warn_where_a_link_does_not_shrink(models: list, spec) -> None:
    """An assistant bridges the gap in size between the teacher and the student: a link whose student is
    not smaller than its teacher is more likely a slip in scheme.assistants than the experiment meant."""
    # Parameter counts only: on the meta device no memory is used and no random numbers are drawn.
    with torch.device("meta"):
        params = [sum(p.numel() for p in build_model(m, spec, pretrained=False).parameters()) for m in models]
    for (teacher, teacher_params), (student, student_params) in itertools.pairwise(zip(models, params)):
        if student_params >= teacher_params:
            log.warning("kd: warning: scheme=ta: %s (%s parameters) teaches %s (%s parameters), which is not smaller; "
                        "list scheme.assistants from the largest to the smallest, each between the teacher and the "
                        "student in size", model_label(teacher), f"{teacher_params:,}", model_label(student),
                        f"{student_params:,}")


@scheme("born_again")
def born_again(run):
    """Furlanello et al. (2018): generation k of the student's architecture learns from generation k-1.

    `scheme.start=scratch` starts from the student trained from labels (generation 0); `teacher`
    starts from the configured teacher, so generation 1 is the distilled student and generation 2
    learns from a distilled student ("distilled student as teacher").
    """
    cfg = run.cfg
    first = run.stored(cfg.student, "teacher") if cfg.scheme.start == "scratch" else run.teacher()
    models = chain_configs(cfg)
    return distill_chain(run, first, models[0], models[1:-1], role="generation")


def _link_settings(cfg) -> tuple[float, float]:
    """alpha and T of the links before the last: `scheme.link_alpha` / `link_T`, else the run's own."""
    alpha, T = cfg.scheme.get("link_alpha"), cfg.scheme.get("link_T")
    return (cfg.alpha if alpha is None else alpha), (cfg.T if T is None else T)


def distill_chain(run, first, first_cfg, links: list, role: str):
    cfg = run.cfg
    teacher, teacher_meta, teacher_path = first
    rows = [run.row("teacher", teacher, first_cfg, teacher_meta, teacher_path, loss=trained_with(teacher_meta))]
    histories = {"teacher": teacher_meta["history"]}
    run.scratch_row(rows, histories)
    teacher_cfg = first_cfg
    link_alpha, link_T = _link_settings(cfg)
    uses = settings_read(build_loss(cfg, link_alpha, link_T).uses, link_alpha)  # as for the student's row
    for number, link_cfg in enumerate(links, 1):
        name = f"{role}_{number}"
        # What the link's training reads, no more: a T it ignores would make a sweep over T train it again.
        lineage = {"teacher_sha256": checksum(teacher.state_dict()), "loss": OmegaConf.to_container(cfg.loss, resolve=True),
                   "alpha": link_alpha, "T": link_T if "T" in uses else None, "seed_offset": 1000 * number}
        path = store_path(cfg, link_cfg, lineage)

        def train_link():
            log.info("%s: %s taught by %s, not in the model store; training it into %s", name, model_label(link_cfg),
                     model_label(teacher_cfg), path)
            # Its own initial weights, as a new network of the paper's: a born-again generation started
            # from its teacher's would follow it closely. The final student keeps the scratch student's,
            # so that its gain over it is paired.
            return run.distill(link_cfg, teacher, build_loss(cfg, link_alpha, link_T), name, path,
                               seed_offset=lineage["seed_offset"], lineage=lineage, taught_by=model_label(teacher_cfg))[:2]

        model, meta, made = run.load_or_make(link_cfg, path, train_link)
        if not made:
            log.info("%s: %s taught by %s, from the model store (%s)", name, model_label(link_cfg),
                     model_label(teacher_cfg), path)
        rows.append(run.row(name, model, link_cfg, meta, path, scheme=cfg.scheme.name, loss=cfg.loss.name,
                            alpha=link_alpha if "alpha" in uses else None, T=lineage["T"],
                            taught_by=model_label(teacher_cfg)))
        histories[name] = meta["history"]
        teacher, teacher_cfg, teacher_path = model, link_cfg, path
    return _student_rows(run, (teacher, teacher_cfg, teacher_path), rows, histories)


def _student_rows(run, last_link, rows: list, histories: dict):
    """The distilled student's rows after `rows`, taught by `last_link` (model, config, path), or by no teacher."""
    teacher, teacher_cfg, teacher_path = last_link or (None, None, None)
    taught = {"taught_by": model_label(teacher_cfg)} if teacher_cfg is not None else {}
    loss_fn = build_loss(run.cfg)
    student, meta, result = run.distill_student(teacher, loss_fn, histories,
                                                **({"teacher": str(teacher_path)} if teacher_path else {}))
    rows.append(run.student_kd_row(student, meta, loss_fn, **taught))
    if run.cfg.get("quant") == "qat":  # the same student in int8: post-training quantized, and quantization-aware KD
        from kd_cli.deploy.qat import qat_rows

        rows += qat_rows(run, teacher, student, loss_fn, **taught)
    return rows, histories, result.val_accuracy
