"""Every config group option composes, for both commands, and bad values are refused."""

import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from kd_cli.cli import config_dir
from kd_cli.config import register_model_groups, validate
from kd_cli.errors import KdError
from kd_cli.models import CATALOGUE

register_model_groups()
CONF = Path(config_dir())


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def composed(command: str, overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name=command, overrides=list(overrides))


@pytest.mark.parametrize("command", ["train", "distill"])
@pytest.mark.parametrize("dataset", options("dataset"))
def test_every_dataset_composes(command, dataset):
    cfg = composed(command, [f"dataset={dataset}"])
    assert cfg.dataset.name == dataset
    assert len(cfg.dataset.mean) == len(cfg.dataset.std) == cfg.dataset.channels
    validate(cfg)


@pytest.mark.parametrize("arch", sorted(CATALOGUE))
def test_every_model_composes_as_teacher_and_student(arch):
    cfg = composed("distill", [f"teacher={arch}", f"student={arch}"])
    assert cfg.teacher.arch == cfg.student.arch == arch
    assert cfg.teacher.checkpoint is None


@pytest.mark.parametrize("loss", options("loss"))
def test_every_loss_composes(loss):
    assert composed("distill", [f"loss={loss}"]).loss.name == loss


@pytest.mark.parametrize("scheme", options("scheme"))
def test_every_scheme_composes(scheme):
    assert composed("distill", [f"scheme={scheme}"]).scheme.name == scheme


@pytest.mark.parametrize("command", ["train", "distill"])
@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(command, experiment):
    cfg = composed(command, [f"experiment={experiment}"])
    validate(cfg)


@pytest.mark.parametrize("command, override, message", [
    ("train", "teacher.checkpoint=t.pt", "kd train trains the teacher from labels and reads no teacher.checkpoint; "
                                         "to distil from a teacher you have, run `kd distill teacher.checkpoint=PATH`"),
    ("train", "student.checkpoint=s.pt", "kd train trains the student from labels and reads no student.checkpoint"),
    ("distill", "student.checkpoint=s.pt", "kd distill trains the student from its seed and reads no student.checkpoint; "
                                           "a trained student is read by `kd export|quantize|bench-model student.checkpoint=PATH`"),
])
def test_a_checkpoint_the_command_would_ignore_is_refused(command, override, message):
    with pytest.raises(KdError, match=re.escape(message)):
        validate(composed(command, [override]))
    validate(composed("distill", ["teacher.checkpoint=t.pt"]))  # read: the teacher to distil from

@pytest.mark.parametrize("value", ["123", "0", "true", "[a]"])
def test_a_checkpoint_that_is_no_text_is_refused(value):
    """Hydra reads `123` as a number: a path to load would be a traceback, and 0 a checkpoint silently ignored."""
    with pytest.raises(KdError, match=re.escape("teacher.checkpoint must be a path, got ")):
        validate(composed("distill", [f"teacher.checkpoint={value}"]))
    validate(composed("distill", ["teacher.checkpoint='123'"]))


def test_experiment_values_beat_primary_defaults():
    cfg = composed("distill", ["experiment=demo"])
    assert cfg.dataset.name == "fashion_mnist" and cfg.train.optimizer == "adam"


def test_alpha_and_T_are_top_level():
    cfg = composed("distill", ["alpha=0.6", "T=4"])
    assert (cfg.alpha, cfg.T) == (0.6, 4)
    assert "alpha" not in composed("train")


@pytest.mark.parametrize("override, message", [
    ("alpha=1.5", "alpha must be in [0, 1]"),
    ("alpha=-0.1", "alpha must be in [0, 1]"),
    ("alpha=abc", "alpha must be a number"),
    ("T=0", "T must be > 0"),
    ("T=-2", "T must be > 0"),
    ("train.epochs=0", "train.epochs must be a whole number >= 1"),
    ("train.epochs=2.5", "train.epochs must be a whole number >= 1"),
    ("train.batch_size=0", "train.batch_size must be a whole number >= 2"),
    ("train.batch_size=1", "train.batch_size must be a whole number >= 2, got 1"),  # every batch would be dropped
    ("data.fraction=0", "data.fraction must be in (0, 1]"),
    ("data.fraction=1.5", "data.fraction must be in (0, 1]"),
    ("data.test_fraction=0", "data.test_fraction must be in (0, 1]"),
    ("train.lr=0", "train.lr must be > 0"),
    ("train.teacher_cache_disk_mb=-1", "train.teacher_cache_disk_mb must be >= 0 (megabytes), got -1"),
    ("train.teacher_cache_max_mb=lots", "train.teacher_cache_max_mb must be a number, got 'lots'"),
    ("train.teacher_cache_max_mb=null", "train.teacher_cache_max_mb must be a number, got None"),
    ("measure.int8=no", "measure.int8 must be true or false, got 'no'"),  # a string would have turned it on
    ("data.augment=null", "data.augment must be true or false, got None"),  # stored under a key of its own
])
def test_validation_refuses(override, message):
    with pytest.raises(KdError, match=message.replace("[", r"\[").replace("(", r"\(").replace("]", r"\]").replace(")", r"\)")):
        validate(composed("distill", [override]))


@pytest.mark.parametrize("overrides, message", [
    (["T=nan"], "T must be a finite number, got nan"),  # NaN passes `T <= 0`, and the run blamed train.lr
    (["T=inf"], "T must be a finite number, got inf"),
    (["train.lr=nan"], "train.lr must be a finite number, got nan"),
    (["train.teacher_cache_disk_mb=inf"], "train.teacher_cache_disk_mb must be a finite number, got inf; for no limit, give a large number"),
    (["loss=combo", "loss.terms={kd:nan}"], "loss.terms.kd must be a finite number, got nan"),
    (["scheme=multi_teacher", "scheme.teachers=[deepnn,lightnn]", "scheme.weights=[nan,1]"],
     "scheme.weights[0] must be a finite number, got nan"),
    (["teacher_recipe={train:{lr:inf}}"], "teacher_recipe.train.lr must be a finite number, got inf"),
])
def test_every_number_must_be_finite(overrides, message):
    with pytest.raises(KdError, match=re.escape(message)):
        validate(composed("distill", overrides))


@pytest.mark.parametrize("command, override", [("distill", "data.root=${oops}"), ("train", "store_dir=${oops}"),
                                               ("distill", "device=${oops}"), ("distill", "dataset.mean=${oops}"),
                                               ("distill", "hydra.run.dir=${oops}")])
def test_a_bad_interpolation_is_one_line_naming_its_key(tmp_path, monkeypatch, command, override):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    key = override.split("=")[0]
    with pytest.raises(KdError, match=re.escape(f"{key}: Interpolation key 'oops' not found; fix the ${{...}} in that value")):
        preflight(command, [override], config_dir())


@pytest.mark.parametrize("override, message", [
    ("dataset.channels=3", "dataset.channels=3 does not describe the files of fashion_mnist (channels: 1); leave it at 1"),
    ("dataset.image_size=32", "dataset.image_size=32 does not describe the files of fashion_mnist (image_size: 28)"),
    ("dataset.num_classes=0", "dataset.num_classes must be a whole number >= 2, got 0"),
    ("dataset.mean=abc", "dataset.mean must be a list of 1 number, one per channel, such as 'dataset.mean=[0.286]'; got 'abc'"),
    ("dataset.mean=[0.1,0.2]", "dataset.mean must be a list of 1 number, one per channel"),
    ("dataset.std=[]", "dataset.std must be a list of 1 number, one per channel and each > 0"),
    ("dataset.std=[0]", "dataset.std must be a list of 1 number, one per channel and each > 0"),  # NaN from the first batch
])
def test_dataset_settings_that_cannot_describe_its_files_are_refused(override, message):
    with pytest.raises(KdError, match=re.escape(message)):
        validate(composed("distill", ["dataset=fashion_mnist", override]))
    validate(composed("distill", ["dataset=fashion_mnist", "dataset.mean=[0.5]", "dataset.std=[0.25]"]))


def test_files_of_another_image_size_are_not_called_corrupt(fashion_mnist):
    from kd_cli.data import _idx_pair

    images, labels = fashion_mnist / "t10k-images-idx3-ubyte.gz", fashion_mnist / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(KdError) as refused:
        _idx_pair(images, labels, 32)  # whole files of another size: another dataset's (image_size cannot change)
    assert refused.value.reason == f"dataset files {images} and {labels} hold 28 x 28 images, not this dataset's " \
                                   f"32 x 32: they are another dataset's; point data.root at this one's files, or " \
                                   f"move them away and download it"


@pytest.mark.parametrize("value", ["'false'", "off", "maybe", "0"])
def test_a_boolean_loss_option_takes_only_true_or_false(value):
    """`loss.virtual='false'` is a string, and a non-empty string is true: the opposite of what was typed."""
    with pytest.raises(KdError, match=re.escape("loss.virtual must be true or false, got ")):
        validate(composed("distill", ["loss=tf_kd", f"loss.virtual={value}"]))
    validate(composed("distill", ["loss=tf_kd", "loss.virtual=false"]))


def test_interpolated_augment_follows_dataset():
    assert composed("train", ["dataset=cifar10"]).data.augment is True
    assert composed("train", ["dataset=mnist"]).data.augment is False
    assert OmegaConf.select(composed("train", ["dataset=mnist", "data.augment=true"]), "data.augment") is True


IGNORED = [
    (["loss=at", "-m", "T=1,2", "alpha=0.1,0.5"],
     ["kd: warning: loss=at does not use T, so T=1,2 trains the same student for every value"]),
    (["-m", "loss=kd,at", "T=1,4"], ["kd: warning: loss=at does not use T, so T=1,4 trains the same student for every value"]),
    (["loss=ce", "alpha=0.2", "T=3"], ["kd: warning: loss=ce does not use alpha, so alpha=0.2 changes nothing",
                                       "kd: warning: loss=ce does not use T, so T=3 changes nothing"]),
    (["loss=kd", "alpha=0.2", "T=3"], []),
    (["loss=at"], []),  # T not given: nothing to warn about
    (["loss=fitnets", "loss.stage1_epochs=1", "T=3"], []),  # its second stage is kd's soft targets
    (["-m", "loss=fitnets", "loss.stage1_epochs=0,1", "T=1,4"], []),  # the jobs with hint epochs use T
    (["-m", "loss=fsp", "loss.stage1_epochs=0,1", "alpha=0.1,0.9"], []),  # and those without, alpha
    (["loss=combo", "loss.terms={at:1000,kd:1}", "T=3"], []),
    (["loss=combo", "loss.terms={at:1000}", "T=3"], ["kd: warning: loss=combo does not use T, so T=3 changes nothing"]),
    (["-m", "loss=combo", "loss.terms={at:1000},{at:1000,kd:1}", "T=1,4"], []),
    (["-m", "hparams_search=optuna", "loss=at"],
     ["kd: warning: loss=at does not use T, so searching it wastes trials; drop it with '~hydra.sweeper.params.T'"]),
    (["-m", "hparams_search=optuna", "loss=at", "~hydra.sweeper.params.T"], []),
    (["-m", "hparams_search=optuna", "loss=at", "T=interval(1,8)"],
     ["kd: warning: loss=at does not use T, so searching it wastes trials; drop T=interval(1,8)"]),
    (["-m", "hparams_search=optuna", "loss=kd"], []),
    (["-m", "loss=at", "T=1,2", f"train.lr={','.join(str(i / 1000) for i in range(1, 300))}"],  # a grid over MAX_GRID
     ["kd: warning: loss=at does not use T, so T=1,2 trains the same student for every value"]),
    # alpha=0 leaves the labels alone: T reaches nothing, unless a chain's links have an alpha of their own.
    (["-m", "loss=kd", "alpha=0", "T=1,4"],
     ["kd: warning: loss=kd with alpha=0 does not use T, so T=1,4 trains the same student for every value"]),
    (["-m", "loss=kd", "alpha=0,0.5", "T=1,4"], []),  # alpha=0 as the grid's CE column: the other jobs use T
    (["loss=dkd", "alpha=0.0", "T=2"], ["kd: warning: loss=dkd with alpha=0 does not use T, so T=2 changes nothing"]),
    (["scheme=ta", "scheme.assistants=[conv4]", "scheme.link_alpha=0.5", "alpha=0", "T=2"], []),
    (["scheme=ta", "scheme.assistants=[conv4]", "scheme.link_alpha=0.5", "scheme.link_T=4", "alpha=0", "T=2"],
     ["kd: warning: loss=kd with alpha=0 does not use T, so T=2 changes nothing"]),
    (["scheme=multi_teacher", "scheme.teachers=[deepnn,resnet18]", "alpha=0", "T=2"], []),  # the ensemble's row
    # Training settings that another one's value decides.
    (["train.optimizer=adam", "train.momentum=0.5"],
     ["kd: warning: train.optimizer=adam does not use train.momentum, so train.momentum=0.5 changes nothing"]),
    (["-m", "train.optimizer=adam,sgd", "train.momentum=0.5,0.9"], []),
    (["train.schedule=cosine", "-m", "train.gamma=0.1,0.2"],
     ["kd: warning: train.schedule=cosine does not use train.gamma, so train.gamma=0.1,0.2 trains the same model for every value"]),
    (["train.schedule=multistep", "train.gamma=0.2", "train.milestones=[0.3]"], []),
    (["experiment=demo"], []),  # a preset's Adam beside the base config's SGD momentum: nothing typed
    (["-m", "train.schedule=cosine,constant", "train.gamma=0.2"],
     ["kd: warning: train.schedule=cosine,constant does not use train.gamma, so train.gamma=0.2 changes nothing"]),
    (["teacher_recipe={train:{optimizer:sgd}}", "train.optimizer=adam", "train.momentum=0.5"], []),  # the teacher's SGD
    # Over MAX_GRID only the first combination is checked: no warning that hangs on a swept setting.
    (["-m", "alpha=0,0.5", "T=1,4", f"train.lr={','.join(str(i / 1000) for i in range(1, 300))}"], []),
    (["-m", "train.optimizer=adam,sgd", "train.momentum=0.5,0.9", f"train.lr={','.join(str(i / 1000) for i in range(1, 300))}"], []),
    (["qat.epochs=2"], ["kd: warning: quant=null does not use qat.epochs, so qat.epochs=2 changes nothing"]),
    (["overwrite=true"],  # kd train's: kd distill trains only what the store lacks (train_missing=true)
     ["kd: warning: kd distill, which never replaces a stored model, does not use overwrite, so overwrite=true changes nothing"]),
    (["quant=qat", "qat.epochs=2"], []),
    (["scheme=self", "teacher=resnet18"], ["kd: warning: scheme=self does not use teacher, so teacher=resnet18 changes nothing"]),
    (["scheme=born_again", "teacher=deepnn"],
     ["kd: warning: scheme=born_again with scheme.start=scratch does not use teacher, so teacher=deepnn changes nothing"]),
    (["scheme=born_again", "scheme.start=teacher", "teacher=deepnn"], []),
    (["scheme=online", "teacher=deepnn"], []),  # without scheme.peers the teacher is the peer
    (["scheme=online", "teacher_recipe={data:{fraction:1.0}}"],
     ["kd: warning: scheme=online, which trains its peers from scratch, does not use teacher_recipe, "
      "so teacher_recipe={data:{fraction:1.0}} changes nothing"]),
    # A chain's link settings: unread without links, and link_T where the links read no T.
    (["-m", "scheme=born_again", "scheme.generations=1", "scheme.link_T=1,2"],
     ["kd: warning: scheme=born_again with scheme.generations=1, which distils no generation before the student, does "
      "not use scheme.link_T, so scheme.link_T=1,2 trains the same model for every value"]),
    (["-m", "scheme=ta", "scheme.assistants=[conv6]", "scheme.link_alpha=0", "scheme.link_T=1,2"],
     ["kd: warning: loss=kd with scheme.link_alpha=0 does not use scheme.link_T, so scheme.link_T=1,2 trains the same "
      "model for every value"]),
    (["scheme=ta", "scheme.assistants=[conv6]", "loss=at", "scheme.link_T=2"],
     ["kd: warning: loss=at does not use scheme.link_T, so scheme.link_T=2 changes nothing"]),
    (["-m", "scheme=ta", "scheme.assistants=[conv6]", "scheme.link_T=1,2"], []),
]


@pytest.mark.parametrize("overrides, warnings", IGNORED, ids=[" ".join(o) for o, _ in IGNORED])
def test_a_setting_the_run_ignores_is_a_warning(tmp_path, monkeypatch, capsys, overrides, warnings):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    preflight("distill", overrides, config_dir())
    assert capsys.readouterr().err.splitlines() == warnings


def test_the_sweeps_of_a_seed_experiment_do_not_repeat_its_warnings(tmp_path, monkeypatch, capsys):
    from kd_cli.preflight import EXPERIMENT_PART_ENV, preflight

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(EXPERIMENT_PART_ENV, "1")  # set by kd_cli.experiments for its child processes
    preflight("distill", ["loss=at", "T=2"], config_dir())
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command, overrides", [
    ("distill", ["loss=kd,at", "alpha=0.1,0.5", "T=1,4", "train.lr=0.1", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2"]),
    ("distill", ["experiment=quick_tutorial", "scheme=offline,multi_teacher", "scheme.teachers=[deepnn]", "+extra=1,2"]),
    ("distill", ["loss=kd,dkd", "loss.nckd_weight=2"]),  # kd has no nckd_weight: Hydra's error, either way
    ("train", ["teacher=deepnn,light6", "~student", "train.epochs=1,2", "seed=0,1"]),
])
def test_preflight_composes_each_combination_as_hydra_does(command, overrides):
    """Combinations that choose the same config options share one composition (kd_cli.preflight._composed)."""
    from kd_cli.preflight import _combinations, _composed, parse_overrides

    def as_composed(compose_it):
        try:
            cfg = OmegaConf.to_container(compose_it(), resolve=False)
        except Exception as e:
            return f"{type(e).__name__}: {e}"
        del cfg["hydra"]["overrides"], cfg["hydra"]["job"]["override_dirname"]  # the command line's own record
        return cfg

    register_model_groups()
    compositions = {}
    for combination in _combinations(parse_overrides(overrides)):
        with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
            expected = as_composed(lambda: compose(command, combination, return_hydra_config=True))
        assert as_composed(lambda: _composed(command, combination, config_dir(), compositions)) == expected, combination
    assert len(compositions) < len(_combinations(parse_overrides(overrides)))


SCHEME_REFUSALS = [
    (["scheme=multi_teacher", "scheme.teachers=[deepnn,lightnn]", "scheme.weights=5"],
     "scheme.weights must be a list of 2 non-negative numbers, one per teacher, such as 'scheme.weights=[1,1]'; got 5"),
    (["scheme=multi_teacher", "scheme.teachers=[deepnn,lightnn,deepnn]"], "scheme.teachers names deepnn twice"),
    (["scheme=ta", "scheme.assistants=[conv6]", "loss=ce"],
     "scheme=ta distils each model of its chain from the one before it, and loss=ce learns from no teacher"),
    (["scheme=born_again", "loss=tf_kd"], "scheme=born_again distils each model of its chain"),
    (["scheme=online", "teacher.checkpoint=teacher.pt"],
     "scheme=online trains its peers from scratch alongside the student and loads no teacher.checkpoint"),
    (["scheme=online", "loss=combo", "loss.terms={kd:1,at:1000}"], "scheme=online combines logits"),
    (["scheme=self", "train.compile=true"], "train.compile=true does not combine with scheme=self, whose exits hook"),
    (["loss=at", "train.compile=true"], "train.compile=true does not combine with losses that hook"),
    (["loss=combo", "loss.terms={kd:1,at:1000}", "train.compile=true"], "train.compile=true does not combine"),
    # scheme=self's exits, traced on one image before anything trains.
    (["scheme=self", "student=lightnn", "scheme.exits=[features.5,features.2]"],
     "scheme.exits must list layers in the order the student runs them, the deepest last: scheme.exits=[features.2,features.5]"),
    (["scheme=self", "student=lightnn", "scheme.exits=[features.2,features.2]"], "scheme.exits names 'features.2' twice"),
    (["scheme=self", "student=lightnn", "scheme.exits=[features.2,classifier.3:in]"],
     "but the student's layer 'classifier.3:in' gives shape (256,); choose convolutional layers for scheme.exits"),
]


@pytest.mark.parametrize("overrides, message", SCHEME_REFUSALS, ids=[" ".join(o) for o, _ in SCHEME_REFUSALS])
def test_scheme_settings_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(KdError, match=re.escape(message)):
        validate(composed("distill", overrides))


def test_exits_may_read_a_layers_input():
    validate(composed("distill", ["scheme=self", "student=lightnn", "scheme.exits=[features.3:in,features.5]"]))


@pytest.mark.parametrize("overrides, message", [
    (["hparams_search=optuna"], "hparams_search runs many trials, each a run: add -m (kd distill -m hparams_search=optuna ...)"),
    (["-m", "hparams_search=optuna", "data.val_fraction=0"], "set data.val_fraction above 0"),
    # The search space is checked at its ends, however it was given (the shell has taken the quotes).
    (["-m", "hparams_search=optuna", "hydra.sweeper.params.T=interval(-2.0, -1.0)"], "T must be > 0 (the softmax temperature), got -2.0"),
    (["-m", "hparams_search=optuna", "hydra.sweeper.params.T=interval(2.0, 8.0)", "loss=kd", "alpha=2"], "alpha must be in [0, 1]"),
    (["-m", "hparams_search=optuna", "hydra.sweeper.params.train.lr=interval(0.1, 0.2)"],
     "'hydra.sweeper.params.train.lr' cannot be set from the command line; to search over train.lr, give it a range: "
     "train.lr='interval(LOW, HIGH)'"),
    (["-m", "hparams_search=optuna", "+hydra.sweeper.params.train.lr=interval(0.1, 0.2)"],
     "'hydra.sweeper.params.train.lr' cannot be set from the command line; to search over train.lr"),
    (["-m", "loss=glob(k*)", "alpha=2"], "alpha must be in [0, 1]"),
    # Optuna's own settings: each failed with a traceback once the sweep had begun.
    (["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=0"], "hydra.sweeper.n_trials must be a whole number >= 1, got 0"),
    (["-m", "hparams_search=optuna", "hydra.sweeper.n_jobs=-1"], "hydra.sweeper.n_jobs must be a whole number >= 1, got -1"),
    (["-m", "hparams_search=optuna", "hydra.sweeper.storage=foo"],
     "hydra.sweeper.storage=foo is no database URL; give one such as hydra.sweeper.storage=sqlite:///optuna.db"),
    (["-m", "hparams_search=optuna", "hydra.sweeper.storage=sqlite:////nonexistent/dir/x.db"],
     "hydra.sweeper.storage=sqlite:////nonexistent/dir/x.db: the folder /nonexistent/dir does not exist"),
    (["-m", "hparams_search=optuna", "hydra.sweeper.storage='sqlite:///~/optuna.db'"], "/~ does not exist"),  # SQLite's ~
    (["-m", "hparams_search=optuna", "hydra.sweeper.n_trials=${oops}"],
     "hydra.sweeper.n_trials: Interpolation key 'oops' not found; fix the ${...} in that value"),
    # Hydra's basic sweeper has no search space: a traceback once preflight had passed, or in it.
    (["-m", "alpha=interval(0,1)"], "alpha=interval(0,1) is a search space, which only hparams_search=optuna searches: "
                                    "add hparams_search=optuna, or sweep a list (alpha=0.1,0.5) or range(START,STOP,STEP)"),
    (["-m", "train.lr=tag(log,interval(0.1,1))"], "train.lr=tag(log,interval(0.1,1)) is a search space"),
    (["-m", "hydra.sweeper.params.alpha=choice(0.1,0.2)"], "hydra.sweeper.params.alpha=choice(0.1,0.2) is a search space"),
    (["hydra.sweeper.params.alpha=0.1"], "hydra.sweeper.params.alpha=0.1 is a search space, which only hparams_search"),
    (["hydra.job.chdir=true"], "hydra.job.chdir=true is not taken: kd reads store_dir and data.root from the folder it started in"),
])
def test_preflight_refuses_a_search_or_sweep_that_cannot_work(tmp_path, monkeypatch, overrides, message):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdError, match=re.escape(message)):
        preflight("distill", overrides, config_dir())


def test_preflight_leaves_hydra_interpolations_to_the_job(tmp_path, monkeypatch):
    """${hydra:...} resolves only inside a running job; the finite-number check must not refuse it."""
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    for command in ("train", "distill"):
        cfg = preflight(command, ["store_dir=${hydra:runtime.cwd}/store"], config_dir())
        assert OmegaConf.select(cfg, "store_dir", throw_on_resolution_failure=False) is None
    with pytest.raises(KdError, match=r"store_dir: Interpolation key 'oops' not found; fix the \$\{...\} in that value"):
        preflight("distill", ["store_dir=${oops}/store"], config_dir())


def test_keys_are_added_to_teacher_recipe_with_a_plus(tmp_path, monkeypatch):
    """teacher_recipe holds the data.* / train.* keys the teacher's recipe changes: none until one is added."""
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    for plus in ("+", "++"):
        cfg = preflight("distill", ["experiment=quick_data_fraction", f"{plus}teacher_recipe.train.epochs=5"], config_dir())
        assert OmegaConf.to_container(cfg.teacher_recipe) == {"data": {"fraction": 0.1}, "train": {"epochs": 5}}
    with pytest.raises(KdError, match="teacher_recipe has no train.epochs to change yet: add it with "
                                      r"\+teacher_recipe.train.epochs=VALUE"):
        preflight("distill", ["experiment=demo", "teacher_recipe.train.epochs=5"], config_dir())


def test_preflight_takes_an_optuna_storage_that_can_open_and_writes_nothing(tmp_path, monkeypatch):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    for storage in ("sqlite:///optuna.db", f"sqlite:///{tmp_path}/studies.db", "postgresql://user@host/kd"):
        assert preflight("distill", ["-m", "hparams_search=optuna", f"hydra.sweeper.storage={storage}"], config_dir())
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("listed, hint", [
    ("T=1,2", ""),  # a number: no list of T's to write
    ("loss.student_layers=features.2,features.5", ", or write a list as loss.student_layers=[features.2,features.5]"),
])
def test_a_list_without_m_is_offered_the_list_form_only_where_a_list_goes(tmp_path, monkeypatch, listed, hint):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdError) as refused:
        preflight("distill", ["loss=at", listed], config_dir())
    assert refused.value.reason == f"{listed} is a list of values: add -m to sweep over them{hint}"


@pytest.mark.parametrize("command, overrides, message", [
    ("distill", ["seed=0,1"], "seed=0,1 is a list of values: add -m to sweep over them"),
    ("distill", ["T=interval(1,4)"], "T=interval(1,4) is a range of values: add -m to sweep over them"),
    ("distill", ["experiment=quick_tutorial", "alpha=0.5,0.6"],
     "experiment=quick_tutorial runs its own sweeps: give each key one value, not alpha=0.5,0.6; to repeat it with "
     "another seed, run `kd distill experiment=quick_tutorial seed=1`"),
    # --cfg shows a run's config: the run's checks come first.
    ("distill", ["alpha=1.5", "--cfg", "job"], "alpha must be in [0, 1]"),
    ("distill", ["dataset=fashion_mnsit", "--cfg", "job"], "unknown dataset 'fashion_mnsit'; choose one of: cifar10,"),
    ("distill", ["seed=0,1", "--cfg", "job"], "seed=0,1 is a list of values: give each key one value"),
    # An experiment brings distill's keys into kd train's config: typed there, they are still refused.
    ("train", ["experiment=quick_tutorial", "alpha=0.5"], "'alpha' is a setting of kd distill, not of kd train"),
])
def test_preflight_refuses_what_hydra_would_take_wrongly_or_in_many_lines(tmp_path, monkeypatch, command, overrides, message):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdError, match=re.escape(message)):
        preflight(command, overrides, config_dir())
    assert not list(tmp_path.iterdir())


def test_cfg_job_shows_a_valid_config_without_warnings(tmp_path, monkeypatch, capsys):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    assert preflight("distill", ["loss=at", "T=3", "--cfg", "job"], config_dir()) is None  # Hydra prints it
    assert preflight("train", ["experiment=quick_tutorial", "train.epochs=2"], config_dir()).train.epochs == 2
    assert capsys.readouterr().err == ""


def test_the_datasets_of_a_sweep_are_looked_for_before_it_runs_except_on_slurm(tmp_path, monkeypatch, datasets_looked_for):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    preflight("distill", ["-m", "dataset=mnist,fashion_mnist", "alpha=0.1,0.9"], config_dir())
    assert datasets_looked_for == {"mnist", "fashion_mnist"}
    datasets_looked_for.clear()
    preflight("distill", ["dataset=mnist", "--cfg", "job"], config_dir())  # shows the config, runs nothing
    assert datasets_looked_for == set()
    # A SLURM job may read data.root on its own node; run without -m, the launcher is not used.
    preflight("distill", ["-m", "dataset=mnist", "alpha=0.1,0.9", "hydra/launcher=slurm"], config_dir())
    assert datasets_looked_for == set()
    preflight("distill", ["dataset=mnist", "hydra/launcher=slurm"], config_dir())
    assert datasets_looked_for == {"mnist"}


def test_a_glob_sweep_is_checked_over_the_configs_it_picks(tmp_path, monkeypatch):
    from kd_cli.preflight import _combinations, parse_overrides, preflight

    monkeypatch.chdir(tmp_path)
    assert preflight("distill", ["-m", "loss=glob(d*)", "T=2"], config_dir()).loss.name == "dkd"  # the last checked
    assert [c[0] for c in _combinations(parse_overrides(["loss=glob(d*)"], config_dir()))] == ["loss=dist", "loss=dkd"]


def test_an_unknown_key_is_not_advised_to_be_added_unless_hydra_reads_it():
    from kd_cli.preflight import preflight

    with pytest.raises(KdError) as error:
        preflight("distill", ["qat.epoch=2"], config_dir())
    assert error.value.reason == "unknown key 'qat.epoch'; did you mean 'qat.epochs'? (`kd distill --cfg job` lists every key)"
    with pytest.raises(KdError, match=re.escape("lists every key; +hydra.launcher.foo=... adds it)")):
        preflight("distill", ["hydra.launcher.foo=1"], config_dir())


def test_keys_added_with_plus_are_refused_unless_hydra_reads_them(tmp_path, monkeypatch):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    assert preflight("distill", ["+hydra.job.env_set.FOO=1"], config_dir()).alpha == 0.9  # a launcher's or Hydra's key
    with pytest.raises(KdError, match=re.escape("unknown key 'zzz' (+zzz=... adds a key that kd does not read")):
        preflight("distill", ["+zzz=1"], config_dir())
    with pytest.raises(KdError, match="'alpha' is a setting of kd distill, not of kd train"):
        preflight("train", ["+alpha=0.5"], config_dir())


def test_a_group_whose_default_is_null_may_be_set_to_null(tmp_path, monkeypatch):
    from kd_cli.preflight import preflight, split_args

    monkeypatch.chdir(tmp_path)
    assert split_args(["experiment=null", "alpha=0.5", "hparams_search=null"]) == ([], ["alpha=0.5"])
    # The last choice of a group counts, null included.
    assert split_args(["experiment=demo", "experiment=null", "alpha=0.5"]) == ([], ["alpha=0.5"])
    assert split_args(["experiment=null", "experiment=demo"]) == ([], ["experiment=demo"])
    assert preflight("distill", ["experiment=null", "hparams_search=null"], config_dir()).alpha == 0.9
    assert preflight("train", ["experiment=null"], config_dir()).command == "train"


@pytest.mark.parametrize("command, overrides, message", [
    ("train", ["teacher=null"], "teacher=null is no model; to train only the other one, write '~teacher' (quoted in a shell)"),
    ("distill", ["-m", "loss=null", "alpha=0.1,0.2"], "loss=null chooses no loss, and kd distill needs one; choose one of: at, cc,"),
    ("distill", ["dataset=null"], "dataset=null chooses no dataset, and kd distill needs one; choose one of: cifar10,"),
])
def test_another_group_set_to_null_is_one_line(tmp_path, monkeypatch, command, overrides, message):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdError, match=re.escape(message)):
        preflight(command, overrides, config_dir())


@pytest.mark.parametrize("command, deleted, message", [
    ("distill", "~teacher", "kd distill keeps a teacher in its config (a loss or scheme that reads none, loss=ce or scheme=self, ignores it): drop '~teacher'; "
                            "'~teacher' and '~student' are for kd train, to train one model"),
    ("distill", "~student", "kd distill trains the student: drop '~student'"),
    ("distill", "~loss", "'~loss' removes a setting kd distill reads; drop it, or give loss another value"),
    ("distill", "~scheme", "'~scheme' removes a setting kd distill reads"),
    ("train", "~measure", "'~measure' removes a setting kd train reads"),
    ("train", "~command", "'~command' removes a setting kd train reads"),
])
def test_removing_a_key_kd_reads_is_refused(tmp_path, monkeypatch, command, deleted, message):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdError, match=re.escape(message)):
        preflight(command, [deleted], config_dir())


def test_what_may_be_removed(tmp_path, monkeypatch):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    assert "teacher" not in preflight("train", ["~teacher"], config_dir())  # kd train trains the student alone
    assert "student" not in preflight("train", ["~student"], config_dir())
    assert preflight("distill", ["~experiment"], config_dir()).alpha == 0.9  # a group empty by default
    assert preflight("distill", ["-m", "hparams_search=optuna", "~hydra.sweeper.params.T"], config_dir())


def test_keys_force_added_are_refused_unless_the_config_has_them(tmp_path, monkeypatch):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdError, match=re.escape("unknown key 'alpah'; did you mean 'alpha'? (++alpah=... adds a key that "
                                                "kd does not read")):
        preflight("distill", ["++alpah=0.5"], config_dir())  # it ran with the config's alpha
    with pytest.raises(KdError, match=re.escape("unknown key 'train.lrr'")):
        preflight("distill", ["-m", "++train.lrr=0.5,0.1"], config_dir())
    assert preflight("distill", ["++alpha=0.5"], config_dir()).alpha == 0.5  # sets a key the config has
    assert preflight("distill", ["loss=at", "++loss.weight=2"], config_dir()).loss.weight == 2
    assert preflight("distill", ["++hydra.job.env_set.FOO=1"], config_dir()).alpha == 0.9


@pytest.mark.parametrize("override, message", [
    ("+alpha=0.5", "+alpha=0.5 adds alpha, which the config has already: drop the + (alpha=0.5)"),
    ("+train.lr=0.1", "+train.lr=0.1 adds train.lr, which the config has already: drop the + (train.lr=0.1)"),
    ("+experiment=demo", "+experiment=demo adds experiment, which the config has already: drop the + (experiment=demo)"),
])
def test_adding_what_the_config_has_says_to_drop_the_plus(tmp_path, monkeypatch, override, message):
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdError) as refused:
        preflight("distill", [override], config_dir())
    assert refused.value.reason == message


def test_a_model_store_under_home_is_expanded_as_data_root_is(tmp_path, monkeypatch):
    """store_dir='~/kd_store' made a folder named `~` in the current one."""
    from kd_cli import teacher_outputs
    from kd_cli.store import store_path

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = composed("train", ["store_dir='~/kd_store'"])
    assert store_path(cfg, cfg.teacher).is_relative_to(tmp_path / "kd_store" / cfg.dataset.name)
    saved = teacher_outputs._file(Path(cfg.store_dir) / "teacher_outputs", "digest")  # where kd distill saves a teacher cache
    assert saved == tmp_path / "kd_store" / "teacher_outputs" / "digest.pt"


def test_a_value_starting_with_tilde_is_to_be_quoted(tmp_path, monkeypatch):
    """No shell expands the ~ of `data.root=~/x`, and Hydra's parser cannot read it."""
    from kd_cli.preflight import preflight

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KdError, match=re.escape("; quote a value that starts with ~: \"data.root='~/x'\"")):
        preflight("distill", ["data.root=~/x"], config_dir())
