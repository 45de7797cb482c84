"""`multi_teacher`: several stored teachers, their soft targets averaged into one teacher."""

import torch
import torch.nn.functional as F
from torch import nn

from kd_cli.engine import evaluate
from kd_cli.losses import build_loss
from kd_cli.schemes import model_config, scheme
from kd_cli.store import trained_with


class SoftTargetEnsemble(nn.Module):
    """Teachers whose class probabilities at temperature T are averaged, per sample.

    Returns T * log(mixture) as its "logits": softmax(logits / T) is then exactly the averaged soft
    targets, so every logit loss distils from the mixture unchanged. Weights are fixed per teacher,
    or each teacher's confidence on the sample (its top probability at T = 1).
    """

    def __init__(self, members: list[nn.Module], T: float, weights: list[float] | None = None, confidence: bool = False):
        super().__init__()
        self.members = nn.ModuleList(members)
        self.T, self.confidence = float(T), confidence
        weights = torch.tensor(weights if weights else [1.0] * len(members), dtype=torch.float32)
        self.register_buffer("weights", weights / weights.sum(), persistent=False)

    def extra_repr(self) -> str:
        # In the repr, so the digest of the teacher cache (teacher_outputs.key) tells temperatures apart.
        return f"T={self.T}, confidence={self.confidence}"

    def forward(self, x):
        logits = torch.stack([member(x) for member in self.members]).float()  # teachers x batch x classes
        soft = F.softmax(logits / self.T, dim=2)
        if self.confidence:
            weights = F.softmax(logits, dim=2).amax(dim=2)
            weights = weights / weights.sum(dim=0, keepdim=True)
        else:
            weights = self.weights[:, None]
        mixture = (weights[..., None] * soft).sum(dim=0)
        return self.T * mixture.clamp_min(torch.finfo(mixture.dtype).tiny).log()

@scheme("multi_teacher")
def multi_teacher(run):
    cfg = run.cfg
    loss_fn = build_loss(cfg)  # config.validate has checked it is a loss on logits
    members, rows, histories = [], [], {}
    model_cfgs = [model_config(name) for name in cfg.scheme.teachers]
    run.require_stored(model_cfgs, "teacher")
    for number, model_cfg in enumerate(model_cfgs, 1):
        model, meta, path = run.stored(model_cfg, "teacher")
        members.append(model)
        rows.append(run.row(f"teacher_{number}", model, model_cfg, meta, path, loss=trained_with(meta)))
        histories[f"teacher_{number}"] = meta["history"]
    weights = list(cfg.scheme.weights) if cfg.scheme.weights else None
    ensemble = SoftTargetEnsemble(members, cfg.T, weights, cfg.scheme.confidence).to(run.device).eval()
    label = "ensemble(" + "+".join(cfg.scheme.teachers) + ")"
    accuracy = {"accuracy": evaluate(ensemble, run.data)}
    # The ensemble is the student's teacher: its row is the one kd compares the student against.
    rows.append(run.row("teacher", ensemble, label, {"metrics": accuracy}, "+".join(r["checkpoint"] for r in rows)))
    run.scratch_row(rows, histories)
    student, meta, result = run.distill_student(ensemble, loss_fn, histories, teacher=label)
    rows.append(run.student_kd_row(student, meta, loss_fn, taught_by=label))
    return rows, histories, result.val_accuracy
