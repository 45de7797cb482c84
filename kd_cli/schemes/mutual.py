"""`online`: deep mutual learning (Zhang et al., 2018): peers trained together from scratch.

Each peer learns from the labels and from the others' soft targets with the run's loss; the
student is peer 0 and the others train alongside it as the loss's helper modules, so they are
optimised, checkpointed and resumed with it and never count as part of it. All peers are updated
together from one summed loss (the paper alternates updates; the gradients of each peer's own
term are the same, the others' logits are one step newer there).
"""

from torch import nn

from kd_cli.engine import evaluate
from kd_cli.losses import DistillationLoss, build_loss
from kd_cli.models import model_label
from kd_cli.schemes import model_config, scheme


class MutualLearning(DistillationLoss):
    """Sum over peers of the mean over the other peers of `base(peer, other peer detached)`."""

    needs_teacher = False

    def __init__(self, base: DistillationLoss, peers: list[nn.Module]):
        super().__init__()
        self.base = base
        self.peers = nn.ModuleList(peers)

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)  # dkd's warm-up ramps each peer's term as it ramps a student's

    def check_epochs(self, epochs: int) -> None:
        self.base.check_epochs(epochs)

    def forward(self, student, teacher, targets, inputs=None, **_):
        everyone = [student["logits"], *(peer(inputs) for peer in self.peers)]
        total = 0.0
        for i, logits in enumerate(everyone):
            others = [other.detach() for j, other in enumerate(everyone) if j != i]
            total = total + sum(self.base({"logits": logits}, {"logits": o}, targets) for o in others) / len(others)
        return total


@scheme("online")
def online(run):
    cfg = run.cfg
    base = build_loss(cfg)  # config.validate has checked it is a loss on logits
    peer_cfgs = [model_config(name) for name in cfg.scheme.peers] if cfg.scheme.peers else [cfg.teacher]
    # Distinct seeds: two peers of one architecture starting equal would stay equal.
    peers = [run.new_model(peer_cfg, seed_offset=1000 * number) for number, peer_cfg in enumerate(peer_cfgs, 1)]
    loss_fn = MutualLearning(base, peers)
    rows, histories = [], {}
    run.scratch_row(rows, histories)
    student, meta, result = run.distill_student(None, loss_fn, histories)
    names = [model_label(c) for c in peer_cfgs]
    for number, (peer, peer_cfg) in enumerate(zip(loss_fn.peers, peer_cfgs), 1):
        metrics = {"accuracy": evaluate(peer, run.data)}
        if run.data.val_y is not None:
            metrics["val_accuracy"] = evaluate(peer, run.data, split="val")
        rows.append(run.row(f"peer_{number}", peer, peer_cfg, {"metrics": metrics}, None, **run.distill_columns(),
                            taught_by="peers"))
    # "peers: ...", not a bare model name: the teacher column of other schemes names a trained model,
    # and these peers started from scratch with the student.
    rows.append(run.student_kd_row(student, meta, loss_fn, taught_by="peers: " + "+".join(names)))
    return rows, histories, result.val_accuracy
