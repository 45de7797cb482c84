"""Training schemes: the pieces against their definitions, then each scheme end to end through `kd`."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from conftest import TINY
from kd_cli.losses.hinton import HintonKD
from kd_cli.losses import build_loss
from kd_cli.measure import count_flops, count_params
from kd_cli.models import ImageSpec, build_model
from kd_cli.schemes.ensemble import SoftTargetEnsemble
from kd_cli.schemes.mutual import MutualLearning
from kd_cli.schemes.self_distillation import EarlyExit, SelfDistillation

SPEC = ImageSpec(channels=1, size=28, num_classes=10)


class Fixed(nn.Module):
    """A "model" that returns given logits whatever its input."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return self.logits


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_ensemble_soft_targets_are_the_weighted_mean(T):
    torch.manual_seed(0)
    a, b = torch.randn(5, 10) * 3, torch.randn(5, 10) * 3
    out = SoftTargetEnsemble([Fixed(a), Fixed(b)], T, weights=[3.0, 1.0])(torch.zeros(5, 1))
    expected = 0.75 * F.softmax(a / T, dim=1) + 0.25 * F.softmax(b / T, dim=1)
    assert torch.allclose(F.softmax(out / T, dim=1), expected, atol=1e-6)


def test_ensemble_confidence_weights_favour_the_surer_teacher():
    sure = torch.tensor([[10.0, 0.0, 0.0]])
    unsure = torch.tensor([[0.0, 0.1, 0.0]])
    out = SoftTargetEnsemble([Fixed(sure), Fixed(unsure)], 1.0, confidence=True)(torch.zeros(1, 1))
    p_sure, p_unsure = F.softmax(sure, 1), F.softmax(unsure, 1)
    w = torch.tensor([p_sure.max(), p_unsure.max()])
    w = w / w.sum()
    assert torch.allclose(F.softmax(out, 1), w[0] * p_sure + w[1] * p_unsure, atol=1e-6)
    assert w[0] > 0.6


def test_mutual_learning_is_each_peer_learning_from_the_other():
    torch.manual_seed(0)
    base = HintonKD(alpha=0.5, T=2.0)
    peer = nn.Linear(4, 3)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    student_logits = torch.randn(6, 3, requires_grad=True)
    loss = MutualLearning(base, [peer])({"logits": student_logits}, None, y, inputs=x)
    peer_logits = peer(x)
    expected = (base({"logits": student_logits}, {"logits": peer_logits.detach()}, y)
                + base({"logits": peer_logits}, {"logits": student_logits.detach()}, y))
    assert torch.allclose(loss, expected)
    loss.backward()
    # The peer learns from its own term only: its gradient equals that of base(peer, student fixed).
    own = torch.autograd.grad(base({"logits": peer(x)}, {"logits": student_logits.detach()}, y), peer.weight)[0]
    assert torch.allclose(peer.weight.grad, own, atol=1e-6)


def test_early_exit_runs_the_backbone_up_to_its_stage_only():
    model = build_model(OmegaConf.create({"arch": "light6", "checkpoint": None}), SPEC).eval()
    stages = model.kd_layers["stages"]
    loss = SelfDistillation(0.5, 3.0, 0.1, stages, SPEC.num_classes)
    loss.attach(model, None, torch.randn(2, 1, 28, 28), 100)
    assert len(loss.heads) == len(stages) - 1
    x = torch.randn(3, 1, 28, 28)
    first = EarlyExit(model, stages[0], loss.heads[0]).eval()
    assert first(x).shape == (3, 10)
    assert count_flops(first, (1, 28, 28)) < count_flops(model, (1, 28, 28)) / 2
    params, size = first.used_size(x[:1])
    conv1 = model.features[0]
    assert conv1.weight.numel() <= params < sum(p.numel() for p in model.parameters()) / 4
    assert size > params * 4 / 2**20  # BatchNorm running statistics count too
    # The backbone itself still runs whole once the exit has been used.
    assert model(x).shape == (3, 10)


def test_an_exit_at_a_layers_input_stops_before_that_layer():
    model = build_model(OmegaConf.create({"arch": "lightnn", "checkpoint": None}), SPEC).eval()
    stages = ["features.3:in", "features.5"]
    loss = SelfDistillation(0.5, 3.0, 0.1, stages, SPEC.num_classes)
    loss.attach(model, None, torch.randn(2, 1, 28, 28), 100)
    x = torch.randn(3, 1, 28, 28)
    exit_logits = EarlyExit(model, stages[0], loss.heads[0]).eval()(x)
    assert torch.equal(exit_logits, loss.heads[0](model.features[:3](x))[1])
    params, _ = EarlyExit(model, stages[0], loss.heads[0]).used_size(x[:1])
    assert params == model.features[0].weight.numel() + model.features[0].bias.numel() + count_params(loss.heads[0])


def test_mutual_learning_passes_the_epoch_to_its_loss():
    """dkd's warm-up ramps the peers' terms as it ramps a student's."""
    base = build_loss(OmegaConf.create({"loss": {"name": "dkd", "warmup_epochs": 4}, "alpha": 0.5, "T": 4.0}))
    mutual = MutualLearning(base, [nn.Linear(3, 10)])
    mutual.set_epoch(1)
    assert base.ramp == 0.25
    mutual.set_epoch(6)
    assert base.ramp == 1.0


def test_self_distillation_loss_teaches_exits_from_the_final_exit_only():
    torch.manual_seed(0)
    model = build_model(OmegaConf.create({"arch": "lightnn", "checkpoint": None}), SPEC)
    stages = model.kd_layers["stages"]
    loss_fn = SelfDistillation(0.5, 3.0, 0.1, stages, 10)
    loss_fn.attach(model, None, torch.randn(2, 1, 28, 28), 100)
    from kd_cli.features import FeatureTaps

    taps = FeatureTaps(model, stages, "student")
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    logits = model(x)
    out = {"logits": logits, **taps.pop()}
    loss = loss_fn(out, None, y)
    # alpha = 0, feature_weight = 0: plain CE on the final exit plus CE on each exit.
    plain = SelfDistillation(0.0, 3.0, 0.0, stages, 10)
    plain.heads = loss_fn.heads
    expected = F.cross_entropy(logits, y) + sum(F.cross_entropy(h(out[p])[1], y) for h, p in zip(loss_fn.heads, stages))
    assert torch.allclose(plain(out, None, y), expected)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------- end to end through `kd`


def rows_of(run_dir: Path) -> dict:
    return {r["role"]: r for r in json.loads((run_dir / "results.json").read_text())["rows"]}


def run_rows(root: Path) -> tuple[Path, dict]:
    (run_dir,) = [p for p in (root / "outputs" / "distill").iterdir() if p.is_dir()]
    return run_dir, rows_of(run_dir)


@pytest.fixture
def kd_tiny(kd, fashion_mnist):
    def distill(*overrides, check=True):
        return kd("distill", *TINY, "train_missing=true", *overrides, check=check)

    return distill


def test_teacher_assistant_chain_stores_and_reuses_the_assistant(kd, kd_tiny):
    links = ("scheme=ta", "scheme.assistants=[conv4]", "scheme.link_alpha=0.9", "scheme.link_T=4")
    first = kd_tiny(*links, "hydra.run.dir=runs/a")
    rows = rows_of(kd.cwd / "runs" / "a")
    assert list(rows) == ["teacher", "student_scratch", "assistant_1", "student_kd"]
    assert (rows["assistant_1"]["model"], rows["assistant_1"]["taught_by"]) == ("conv4", "mnist_teacher")
    assert rows["student_kd"]["taught_by"] == "conv4" and rows["student_kd"]["scheme"] == "ta"
    assert "training it from labels (train_missing=true)" in first.stdout + first.stderr
    stored = kd.cwd / rows["assistant_1"]["checkpoint"]
    assert stored.is_file() and "store/fashion_mnist/conv4" in str(stored)
    # A sweep over the last link trains the assistant once.
    again = kd_tiny(*links, "alpha=0.5", "hydra.run.dir=runs/b")
    assert "assistant_1: conv4 taught by mnist_teacher, from the model store" in again.stdout + again.stderr
    assert rows_of(kd.cwd / "runs" / "b")["assistant_1"]["checkpoint"] == rows["assistant_1"]["checkpoint"]
    # Another alpha for the links makes another assistant. At alpha 0 labels alone train it: its row
    # names no temperature, where the first one's does.
    kd_tiny(*links, "scheme.link_alpha=0", "hydra.run.dir=runs/c")
    other = rows_of(kd.cwd / "runs" / "c")["assistant_1"]
    assert other["checkpoint"] != rows["assistant_1"]["checkpoint"]
    assert (other["alpha"], other["T"], rows["assistant_1"]["T"]) == (0, None, 4)


def test_born_again_generations_learn_from_the_previous_one(kd, kd_tiny):
    kd_tiny("scheme=born_again", "scheme.generations=3")
    _, rows = run_rows(kd.cwd)
    assert list(rows) == ["teacher", "student_scratch", "generation_1", "generation_2", "student_kd"]
    assert {r["model"] for r in rows.values()} == {"mnist_student"}
    assert rows["teacher"]["checkpoint"] == rows["student_scratch"]["checkpoint"]  # generation 0
    assert rows["generation_1"]["checkpoint"] != rows["generation_2"]["checkpoint"]


def test_multi_teacher_reports_each_teacher_the_ensemble_and_the_student(kd, kd_tiny):
    kd_tiny("scheme=multi_teacher", "scheme.teachers=[mnist_teacher,conv2]", "scheme.weights=[2,1]")
    _, rows = run_rows(kd.cwd)
    assert list(rows) == ["teacher_1", "teacher_2", "teacher", "student_scratch", "student_kd"]
    ensemble = rows["teacher"]
    assert ensemble["model"] == "ensemble(mnist_teacher+conv2)"
    assert ensemble["params"] == rows["teacher_1"]["params"] + rows["teacher_2"]["params"]
    assert rows["student_kd"]["taught_by"] == ensemble["model"]
    assert rows["student_kd"]["helper_params"] == 0  # the members are teachers, not trained beside the student
    assert rows["student_kd"]["teacher_retained"] == pytest.approx(
        100 * rows["student_kd"]["accuracy"] / ensemble["accuracy"], abs=0.011)


def test_online_peers_train_together_from_scratch(kd, kd_tiny):
    kd_tiny("scheme=online", "scheme.peers=[mnist_student]")
    run_dir, rows = run_rows(kd.cwd)
    assert list(rows) == ["student_scratch", "peer_1", "student_kd"]
    assert rows["peer_1"]["model"] == "mnist_student" and rows["peer_1"]["accuracy"] > 30
    # Different starting weights: the two peers of one architecture did not stay equal.
    assert rows["peer_1"]["accuracy"] != rows["student_kd"]["accuracy"] or rows["student_kd"]["accuracy"] != rows["student_scratch"]["accuracy"]
    assert rows["student_kd"]["helper_params"] == rows["peer_1"]["params"]
    assert rows["student_kd"]["taught_by"] == "peers: mnist_student"
    assert not (kd.cwd / "outputs" / "store" / "fashion_mnist" / "mnist_teacher").exists()  # no teacher needed


def test_self_distillation_reports_each_exit_and_the_deployed_student(kd, kd_tiny):
    kd_tiny("student=lightnn", "scheme=self")
    _, rows = run_rows(kd.cwd)
    assert list(rows) == ["student_scratch", "exit_1", "student_kd"]
    exit_row, student = rows["exit_1"], rows["student_kd"]
    assert exit_row["model"] == "lightnn@features.2"
    assert exit_row["flops"] < student["flops"] and exit_row["params"] < student["params"]
    assert student["params"] == rows["student_scratch"]["params"]  # the exits are not part of the deployed model
    assert student["helper_params"] > 0


def test_teacher_free_is_offline_kd_from_the_students_own_model(kd, kd_tiny):
    kd_tiny("teacher=mnist_student")
    _, rows = run_rows(kd.cwd)
    assert rows["teacher"]["checkpoint"] == rows["student_scratch"]["checkpoint"]
    assert rows["student_kd"]["taught_by"] == "mnist_student"
    # Seed 1 taught by seed 0's model, named by its file: the teacher's row gives the seed it was trained with.
    kd_tiny("teacher=mnist_student", f"teacher.checkpoint={rows['teacher']['checkpoint']}", "seed=1",
            "hydra.run.dir=seed1")
    rows = rows_of(kd.cwd / "seed1")
    assert (rows["teacher"]["seed"], rows["student_scratch"]["seed"], rows["student_kd"]["seed"]) == (0, 1, 1)
    # What kd warned changes nothing is recorded, for kd report: TINY trains with Adam, which reads no momentum.
    assert {"train.momentum", "train.nesterov"} <= set(json.loads((kd.cwd / "seed1" / "results.json").read_text())["unread"])


def test_teacher_recipe_trains_the_teacher_on_other_data(kd, kd_tiny):
    kd_tiny("teacher_recipe={data:{fraction:0.1}}")
    _, rows = run_rows(kd.cwd)
    teacher = torch.load(kd.cwd / rows["teacher"]["checkpoint"], weights_only=True)
    scratch = torch.load(kd.cwd / rows["student_scratch"]["checkpoint"], weights_only=True)
    assert teacher["meta"]["recipe"]["data"]["fraction"] == 0.1
    assert scratch["meta"]["recipe"]["data"]["fraction"] == 0.05


@pytest.mark.parametrize("overrides, message", [
    (["scheme=ta"], "scheme=ta needs scheme.assistants, a list of models such as 'scheme.assistants=[conv8,conv6]'"),
    (["scheme=ta", "scheme.assistants=[conv5]"], "scheme.assistants: unknown model 'conv5'; choose from: conv10,"),
    (["scheme=multi_teacher", "scheme.teachers=[conv2,conv4]", "scheme.weights=[1]"], "scheme.weights must be 2 non-negative numbers"),
    (["scheme=born_again", "scheme.generations=0"], "scheme.generations must be a whole number >= 1, got 0"),
    (["scheme=multi_teacher", "scheme.teachers=[conv2]", "loss=at"], "scheme=multi_teacher combines logits"),
    # The ensemble's T * log of averaged probabilities are no logits to regress (shifted per sample, by T).
    (["scheme=multi_teacher", "scheme.teachers=[conv2]", "loss=logits_mse"],
     "scheme=multi_teacher averages its teachers' probabilities, and a mixture has no logits for loss=logits_mse"),
    (["scheme=multi_teacher", "scheme.teachers=[conv2]", "loss=combo", "loss.terms={kd:1,logits_mse:1}"],
     "a mixture has no logits for loss=combo to regress"),
    (["scheme=self", "student=mnist_student"], "scheme=self needs at least two stages"),
    (["scheme=online", "quant=qat"], "quant=qat fine-tunes a student from its teacher: use it with scheme=offline, ta or born_again"),
    (["teacher_recipe={data:{fractoin:1.0}}"], "teacher_recipe: unknown key 'data.fractoin'; did you mean 'data.fraction'?"),
    (["teacher_recipe={data:{fraction:2}}"], "kd: error: teacher_recipe: data.fraction must be in (0, 1], got 2"),
    (["teacher_recipe={train:{epochs:1,schedule:{x:1}}}"], "teacher_recipe: 'train.schedule' is a value, not a group of keys"),
    # Options are a scheme's yaml keys: another scheme's option is named as such, also when added with +.
    (["scheme=ta", "scheme.generations=3"],
     "scheme=ta has no option 'generations'; it is an option of scheme=born_again; its options are: assistants, link_alpha, link_T"),
    (["scheme=ta", "scheme.assistants=[conv8]", "+scheme.generations=3"], "scheme=ta has no option 'generations'"),
    (["scheme=ta", "scheme.asistants=[conv8]"], "scheme=ta has no option 'asistants' (did you mean 'assistants'?)"),
    # Checked in preflight, before any data is loaded or a run folder made.
    (["scheme=self", "loss=dkd"], "scheme=self distils between the student's own exits with KD; leave loss=kd"),
    (["scheme=self", "scheme.exits=[foo.bar]"], "the student has no layer 'foo.bar'; valid paths"),
    (["scheme=self", "student=light6", "scheme.exits=[features.13]"],
     "scheme=self needs at least two stages to put exits after; scheme.exits names 1; name scheme.exits=[PATH,...] with two or more"),
    (["scheme=online", "loss=tf_kd"], "scheme=online combines logits"),
])
def test_bad_scheme_settings_exit_with_one_line(kd, kd_tiny, overrides, message):
    proc = kd_tiny(*overrides, check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert message in lines[0]
    assert not (kd.cwd / "outputs" / "distill").exists()  # refused before a run folder was made


def test_a_teacher_assistant_chain_that_does_not_shrink_is_warned_of(caplog):
    from kd_cli.schemes.chain import _warn_where_a_link_does_not_shrink

    spec = ImageSpec(3, 32, 10)
    chain = lambda *archs: [OmegaConf.create({"arch": a}) for a in archs]  # noqa: E731
    rng = torch.get_rng_state()
    _warn_where_a_link_does_not_shrink(chain("conv10", "conv8", "conv4", "conv2"), spec)
    assert caplog.messages == []
    _warn_where_a_link_does_not_shrink(chain("conv10", "conv2", "conv4"), spec)
    assert caplog.messages == ["kd: warning: scheme=ta: conv2 (15,338 parameters) teaches conv4 (76,010 parameters), "
                               "which is not smaller; list scheme.assistants from the largest to the smallest, each "
                               "between the teacher and the student in size"]
    assert torch.equal(torch.get_rng_state(), rng)  # counting parameters drew no random numbers


def test_multi_teacher_names_every_missing_teacher_before_loading_any(tmp_path, fashion_mnist, monkeypatch):
    from kd_cli import run as run_module
    from kd_cli.bench.sides import compose_config
    from kd_cli.errors import KdError
    from kd_cli.schemes.ensemble import multi_teacher

    cfg = compose_config("distill", [*TINY, f"store_dir={tmp_path / 'store'}", "device=cpu", "scheme=multi_teacher",
                                     "scheme.teachers=[conv4,mnist_teacher,conv2]"])
    run = run_module.Run.start(cfg, tmp_path / "run")
    store_path = run_module.store_path
    conv4 = store_path(cfg, OmegaConf.create({"arch": "conv4"}))
    conv4.parent.mkdir(parents=True)
    conv4.touch()  # stored: not named, and not loaded either (this empty file would be refused)
    with pytest.raises(KdError) as refused:
        multi_teacher(run)
    message = str(refused.value)
    assert message.startswith(f"kd: error: no trained teacher mnist_teacher, conv2 for fashion_mnist (seed 0, this recipe) "
                              f"in {tmp_path / 'store'}; run `kd train")
    assert "teacher=mnist_teacher '~student'` and `kd train" in message and "teacher=conv2 '~student'`" in message
    assert message.endswith("first or pass train_missing=true to train them here")
