"""The `kd` command: a dispatcher in front of one Hydra app per subcommand.

Hydra has no subcommands, so `kd distill ARGS` becomes the Hydra app whose primary config is
conf/distill.yaml, run with ARGS; `-m`, `--cfg job` and launchers work unchanged, and `--help` lists the
config groups of that command alone.
"""

import logging
import os
import signal
import sys
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException
from hydra.types import RunMode

from kd_cli import __version__
from kd_cli.atomic import atomic_write_text
from kd_cli.errors import KdError, Terminated, UsageError

COMMANDS = {
    "train": "train the teacher and the student from labels alone, into the model store",
    "distill": "train the student from a stored teacher with a distillation loss",
}

# ---- kd report: a plain argparse command (kd_cli/report.py), not a Hydra app ----
COMMANDS["report"] = "one table and plots over run and sweep folders: seeds pooled, KD gain with a 95% CI"

# ---- kd export / quantize / bench-model: plain argparse commands (kd_cli/deploy/), not Hydra apps ----
from kd_cli.deploy import COMMANDS as DEPLOY_COMMANDS  # noqa: E402

COMMANDS |= DEPLOY_COMMANDS


def config_dir() -> str:
    """conf/ beside the package in a checkout or editable install, inside it in a wheel install."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "distill.yaml").is_file():
            return str(candidate)
    raise SystemExit("kd: error: the conf/ folder is missing from this installation; reinstall kd")


def _task(name: str):
    from kd_cli import commands

    run = getattr(commands, f"run_{name}")

    def task(cfg) -> float | None:
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        try:
            objective = run(cfg, run_dir)
            (run_dir / "error.txt").unlink(missing_ok=True)  # an earlier failure of this job is history now
            return objective
        except BrokenPipeError:  # stdout's reader has gone (| head); Hydra's handler would call it a failure
            raise SystemExit(_reader_gone()) from None
        except KeyboardInterrupt:  # stopped, not failed: the sweep's summary lists the job as unfinished
            (run_dir / "error.txt").unlink(missing_ok=True)
            raise
        except BaseException as e:
            # Left in the run directory for sweep summaries and for whoever looks at it later; atomically,
            # so that a full disk leaves no empty file, and without replacing the run's own error.
            try:
                atomic_write_text(run_dir / "error.txt", "".join(traceback.format_exception(e)) + f"{e}\n")
            except KdError:
                pass
            single_run = HydraConfig.get().mode == RunMode.RUN
            if isinstance(e, KdError) and single_run and os.environ.get("HYDRA_FULL_ERROR") != "1":
                print(e, file=sys.stderr)  # one line; Hydra would add its own lines around it
                raise SystemExit(1) from None
            raise

    return task


def _overrides_of(folder: Path, multirun: bool) -> list[str] | None:
    import yaml

    try:
        if multirun:
            return list(yaml.safe_load((folder / "multirun.yaml").read_text())["hydra"]["overrides"]["task"])
        return list(yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text()) or [])
    except (OSError, KeyError, TypeError, yaml.YAMLError):
        return None


def _swept_keys(overrides: list[str]) -> list[str]:
    from kd_cli.preflight import parse_overrides

    return [o.get_key_element() for o in parse_overrides(overrides) if o.is_sweep_override()]


def _reordered(earlier: list[str], args: list[str]) -> str | None:
    """The earlier sweep's overrides of the keys `args` sweeps over the same values in another order, or None."""
    from kd_cli.preflight import parse_overrides, settings_of

    def values(overrides):
        return {o.get_key_element(): o for o in parse_overrides(overrides) if o.is_discrete_sweep()}

    before, now = values(earlier), values(args)
    if before.keys() != now.keys() or not before:
        return None
    unswept = [{k: v for k, v in settings_of(overrides).items() if k not in now} for overrides in (earlier, args)]
    if unswept[0] != unswept[1]:
        return None
    if any(sorted(before[k].sweep_string_iterator()) != sorted(now[k].sweep_string_iterator()) for k in now):
        return None
    changed = [k for k in now if list(before[k].sweep_string_iterator()) != list(now[k].sweep_string_iterator())]
    return " ".join(before[k].input_line for k in changed) or None


def resume_target(command: str, args: list[str]) -> list[str]:
    """With resume=true, point Hydra at the newest unfinished run (or sweep) of the same command line.

    The previous run's folder is reused: a job with complete results is skipped, a job with a
    training state continues from it, a failed or missing one runs again.
    """
    from kd_cli.preflight import settings_of, split_args

    flags, args = split_args(args)
    if "resume=true" not in (a.lower() for a in args) or any(a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")) for a in args):
        return []
    multirun = "--multirun" in flags
    if multirun and settings_of(args).get("hparams_search") not in (None, "null"):
        # Its trials come from the study, which lives in the sweeper's memory unless it has a storage.
        print("kd: resume=true does not continue an hparams_search sweep; starting a new one "
              "(hydra.sweeper.storage=sqlite:///optuna.db keeps its study, and a sweep with it continues it)",
              file=sys.stderr)
        return []
    root = Path("outputs") / (f"{command}-multirun" if multirun else command)
    earlier = [(folder, overrides) for folder in sorted(root.glob("*"), reverse=True)
               if (overrides := _overrides_of(folder, multirun)) is not None]
    wanted = settings_of(args)
    if multirun and not any(settings_of(overrides) == wanted for _, overrides in earlier):
        for folder, overrides in earlier:
            if reordered := _reordered(overrides, args):
                raise KdError(f"resume=true: {folder} swept {reordered}, in that order, and Hydra numbers a sweep's "
                              f"jobs by it; give the values in that order to resume it")
    for folder, overrides in earlier:
        if settings_of(overrides) != wanted:
            continue
        if not multirun and (folder / "results.json").exists():
            continue
        if multirun and _swept_keys(overrides) != _swept_keys(args):
            raise KdError(f"resume=true: {folder} swept {', '.join(_swept_keys(overrides))} in that order, and Hydra "
                          f"numbers a sweep's jobs by it; give the swept keys in that order to resume it")
        print(f"kd: resuming {folder}", file=sys.stderr)
        return [f"hydra.{'sweep' if multirun else 'run'}.dir={folder}"]
    print(f"kd: no unfinished run of this command line under {root}; starting a new one", file=sys.stderr)
    return []


def continued_search(cfg, args: list[str]) -> list[str]:
    """A seed for the sampler of an Optuna study that hydra.sweeper.storage already holds trials of.

    The preset seeds the sampler with a fixed number, so that a search can be repeated; a sweep that
    continues a stored study would then draw TPE's random start-up trials again, the earlier sweep's
    first ones (its seed + the number of trials so far draws others, and is as repeatable).
    """
    from omegaconf import OmegaConf

    sweeper = OmegaConf.select(cfg, "hydra.sweeper") if cfg is not None else None
    if not sweeper or "optuna" not in str(sweeper.get("_target_", "")).lower() or not sweeper.get("storage"):
        return []
    seed = OmegaConf.select(sweeper, "sampler.seed", default=None)
    if seed is None or any(a.lstrip("+").startswith("hydra.sweeper.sampler.seed=") for a in args):
        return []
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        trials = len(optuna.load_study(study_name=sweeper.study_name, storage=sweeper.storage).trials)
    except Exception:  # no such study yet, or a storage the sweeper itself will report on
        return []
    if not trials:
        return []
    print(f"kd: continuing Optuna study '{sweeper.study_name}' ({trials} trial{'' if trials == 1 else 's'} in "
          f"{sweeper.storage}) with its sampler seeded {seed + trials}, not {seed}, so that it draws new trials "
          f"(hydra.sweeper.sampler.seed=N to choose)", file=sys.stderr)
    return [f"hydra.sweeper.sampler.seed={seed + trials}"]


def command_help(command: str, overrides: list[str]) -> str:
    """`kd COMMAND --help`: the config groups this command composes, with their options, then its config.

    Hydra's own help lists every group under conf/, loss= and scheme= among them for `kd train`, which
    refuses them; the groups of the command's own defaults list are the ones it takes.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(command, overrides, return_hydra_config=True)
        options = GlobalHydra.instance().config_loader().get_group_options
        choices = cfg.hydra.runtime.choices
        groups = [f"  {group}: {', '.join(options(group))} (now: {choices[group] or 'none'})"
                  for group in sorted(choices) if not group.startswith("hydra/") or group == "hydra/launcher"]
    with open_dict(cfg):
        del cfg["hydra"]
    return "\n".join([f"kd {command}: {COMMANDS[command]}", "",
                      f"usage: kd {command} [GROUP=OPTION | KEY=VALUE ...] [-m] [--cfg job] (docs: README.md)", "",
                      "config groups, GROUP=OPTION:", *groups, "",
                      f"config, KEY=VALUE (`kd {command} --cfg job` prints it alone):", "", OmegaConf.to_yaml(cfg)])


def usage() -> str:
    lines = [f"kd {__version__}: knowledge-distillation experiments", "", "usage: kd COMMAND [OVERRIDES...] [-m]", ""]
    width = max(map(len, COMMANDS)) + 2
    lines += [f"  {name:<{width}}{text}" for name, text in COMMANDS.items()]
    lines += ["", "kd COMMAND --help shows its options; kd train|distill --cfg job shows the composed config.",
              "examples:", "  kd train teacher=resnet18 student=light6", "  kd distill loss=kd alpha=0.6 T=4",
              "  kd distill -m alpha=0.1,0.5,0.9 T=1,2,4,8"]
    return "\n".join(lines)


def _terminate(signum, frame):
    # Once: a scheduler signals every process of the job, and a seed experiment its child sweep too; a
    # second SIGTERM would interrupt the cleanup and the sweep summary that the first one started.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated


def _until_the_reader_stops(command) -> int:
    """`command()`'s exit status; 141, quietly, when stdout's reader has gone (`kd report --format csv | head`)."""
    try:
        return command()
    except BrokenPipeError:
        return _reader_gone()


def _reader_gone() -> int:
    """The exit status once stdout's reader has gone: as a shell tool killed by SIGPIPE, no traceback,
    128 + 13. Python's last flush at exit would meet the closed pipe again, so stdout now points at /dev/null."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


def main() -> None:
    # Log lines go to stdout (Hydra's --info too): once a reader stops early (| head), logging would
    # print a traceback for every line still to come. Tests that call kd's functions keep the default.
    logging.raiseExceptions = False
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        sys.exit(_until_the_reader_stops(lambda: print(usage(), flush=True) or 0))
    if args[0] == "--version":
        sys.exit(_until_the_reader_stops(lambda: print(__version__, flush=True) or 0))
    command = args[0]
    if command not in COMMANDS:
        print(f"kd: error: unknown command '{command}'; choose one of: {', '.join(COMMANDS)} (kd --help)", file=sys.stderr)
        sys.exit(2)
    if command == "report":  # ---- kd report: plain argparse, see kd_cli/report.py ----
        from kd_cli.report import main as report_main

        sys.exit(_until_the_reader_stops(lambda: report_main(args[1:])))
    if command in DEPLOY_COMMANDS:  # ---- plain argparse, see kd_cli/deploy/ ----
        from kd_cli.deploy import main as deploy_main

        sys.exit(_until_the_reader_stops(lambda: deploy_main(command, args[1:])))

    signal.signal(signal.SIGTERM, _terminate)
    sweep = None  # kd_cli.sweep once imported: whatever ends the command, its started sweeps get a summary
    started = False  # whether Hydra has been handed the run: before that, a stop leaves nothing to resume
    try:
        # Importing torch takes seconds: a Ctrl-C then also gets one line, not a traceback.
        from kd_cli import sweep
        from kd_cli.config import register_model_groups
        from kd_cli.preflight import preflight, split_args

        register_model_groups()
        try:
            flags, overrides = split_args(args[1:])
            if "--help" in flags:
                try:
                    text = command_help(command, overrides)
                except HydraException as e:
                    # A bad override: its one-line explanation (with -m, as a list is not the problem here).
                    preflight(command, [*overrides, "-m"], config_dir(), warn=False, data=False)
                    drop = "drop -m and " if "--multirun" in flags else ""
                    raise KdError(f"--help shows one run's config; {drop}give each key one value "
                                  f"({str(e).strip().splitlines()[0]})") from None
                sys.exit(_until_the_reader_stops(lambda: print(text) or 0))
            cfg = preflight(command, args[1:], config_dir())
            if command == "distill":  # a seed experiment is several sweeps: kd_cli/experiments.py runs them
                from kd_cli.experiments import preset_of, run_experiment

                preset = preset_of(args[1:], cfg)
                if preset is not None:
                    started = True
                    sys.exit(run_experiment(args[1:], preset, config_dir()))
            if cfg is not None and "--multirun" not in flags:
                from kd_cli.run import finished_run_folder

                if finished := finished_run_folder(cfg):
                    print(f"kd: {finished} already holds this run's results; nothing to do (another hydra.run.dir "
                          f"runs it again)", file=sys.stderr)
                    sys.exit(0)
            resumed = resume_target(command, args[1:]) + continued_search(cfg, args[1:])
        except KdError as e:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(e, file=sys.stderr)
            sys.exit(2 if isinstance(e, UsageError) else 1)
        # Hydra's argparse reads no override after a flag: its flags go first.
        sys.argv = [f"kd {command}", *flags, *overrides, *resumed]
        if cfg is None and hasattr(signal, "SIGPIPE"):
            # Hydra only prints (--cfg, --info), with its own handler of errors: once the reader stops
            # (| head), the process ends as a shell tool does, quietly with 141, not with a traceback.
            signal.signal(signal.SIGPIPE, signal.SIG_DFL)
        started = True
        hydra.main(config_path=config_dir(), config_name=command, version_base="1.3")(_task(command))()
    except KeyboardInterrupt as stop:
        # Each finished epoch is saved (state/), so a stopped run loses at most the epoch in progress.
        how, status = ("terminated", 143) if isinstance(stop, Terminated) else ("interrupted", 130)
        if started:
            print(f"kd: {how}; rerun the same command with resume=true to continue from its last finished epoch, "
                  f"if one finished", file=sys.stderr)
        else:
            print(f"kd: {how} before the run started; nothing was written", file=sys.stderr)
        sys.exit(status)
    finally:
        failed_after = 0  # the exit status of a summary that went wrong once the jobs had ended
        for sweep_dir in sweep.started_sweeps if sweep else []:
            try:
                sweep.summarize(sweep_dir)
            except KeyboardInterrupt:  # a second Ctrl-C, or one once the jobs had ended: one line, not a traceback
                print(f"kd: interrupted; the summary of {sweep_dir} was skipped (`kd report {sweep_dir}` writes its "
                      f"report)", file=sys.stderr)
                failed_after = 130
            except KdError as e:  # summary.csv could not be written (a full disk): one line, not a traceback
                print(e, file=sys.stderr)
                failed_after = failed_after or 1
        if failed_after and sys.exc_info()[0] is None:  # the sweep had ended: its exit status says what went wrong after
            sys.exit(failed_after)
