"""The ``segcal`` command line: run the stages locally, submit them to a cluster, refresh nightly.

Commands (each has ``--help``; ``--set key=value`` overrides a config key, repeatable)::

    segcal check CONFIG            the preflight alone: datasets listed, one image of each through
                                   the model, channel count, input recipe, a quick mIoU
    segcal run CONFIG [--output DIR]   extract, fit, evaluate, report; skips stages that are
                                   current
    segcal demo [--data DIR] [--weights FILE] [--quick]   CamVid + ESPNet (found or downloaded),
                                   all stages, then the headline table
    segcal extract|fit|evaluate|report CONFIG     one stage, always run
    segcal export CONFIG           TorchScript files of the fitted calibrators (optionally + model)
    segcal submit CONFIG [STAGE] --address http://HOST:8265 [--follow] [--env K=V]
                   [--env-from-cluster NAME] [--skip-check] [-- ARGS]
    segcal refresh CONFIG [--registry DIR] [--allow-adaptive] [--no-drift-exit]
                                   nightly refresh with champion/challenger promotion
    segcal promote DIR RUN_ID      point DIR/current at a stored run (by hand, e.g. to roll back)
    segcal status DIR [--html]     the current champion, the last decisions and the last
                                   night's drift alarms and label-free estimates

``run``, ``extract`` and ``refresh`` run the preflight (:mod:`pipeline.preflight`) before Ray
starts (``--no-check`` skips it). ``-v`` (tracebacks, INFO logs) and ``-q`` (no preflight
lines) go before or after the command. A failure prints one line naming the original error;
its traceback is shown with ``-v`` and written to ``OUTPUT/error.log``.

Exit codes, for scripts:

    0  success (for ``refresh``: the challenger was promoted or the champion kept; see the
       printed decision or ``segcal status``)
    1  a stage failed, or the submitted job failed (``submit --follow`` returns the job's own
       exit code when it has one)
    2  usage or config error (bad arguments, unreadable or invalid config, unknown key; a
       preflight error: missing data or labels, a model that does not load or outputs the wrong
       channel count; for ``demo``: CamVid or the weights missing, malformed or not
       downloadable, with what to set)
    3  the cluster or the registry is unavailable: unreachable address, credentials refused,
       registry locked by another refresh, broken ``current``, unknown run
    4  ``refresh`` only: the refresh succeeded (promoted or kept as usual, recorded) but a drift
       alarm fired on a monitor or test set (``--no-drift-exit``: 0 instead)

Stage commands connect to ``RAY_ADDRESS`` when set (inside a Ray job it is; ``RAY_ADDRESS=auto``
joins a ``ray start`` cluster on this machine) and otherwise start Ray on this machine, listening
on 127.0.0.1 only (``SEGCAL_RAY_BIND=all`` for every interface); see ``pipeline/runtime.py``.

This module is the entry point: the parser (:func:`build_parser`, :func:`parse_args`), and
:func:`main`, which runs a command and turns its failure into one line and an exit code
(:func:`root_cause`, ``OUTPUT/error.log``). What each command does is in
:mod:`pipeline.cli_commands`.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.cli_commands import (
    DRIFT,
    FAILED,
    OK,
    UNAVAILABLE,
    USAGE,
    UsageError,
    cmd_check,
    cmd_demo,
    cmd_export,
    cmd_promote,
    cmd_refresh,
    cmd_run,
    cmd_stage,
    cmd_status,
    cmd_submit,
)
from pipeline.paths import ERROR_LOG

# The exit codes and UsageError are defined with the commands that return and raise them
# (pipeline.cli_commands) and importable from here, the entry point that documents them.
__all__ = [
    "DRIFT",
    "FAILED",
    "OK",
    "UNAVAILABLE",
    "USAGE",
    "UsageError",
    "build_parser",
    "main",
    "parse_args",
    "root_cause",
]


# --- parser ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``segcal`` (one sub-parser per command)."""
    parser = argparse.ArgumentParser(
        prog="segcal",
        description="Calibrate semantic-segmentation models on Ray.",
        epilog="Exit codes: 0 ok, 1 stage or job failed, 2 usage/config error, "
        "3 cluster or registry unavailable, 4 refresh done but a drift alarm fired.",
    )
    _add_verbosity(parser, default=False)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    # -v/-q after the command too; SUPPRESS keeps a sub-parser from resetting what the main
    # parser read before it.
    common = argparse.ArgumentParser(add_help=False)
    _add_verbosity(common, default=argparse.SUPPRESS)

    def add(
        name: str, *, parents: Sequence[argparse.ArgumentParser] = (), **kwargs: Any
    ) -> argparse.ArgumentParser:
        return sub.add_parser(name, parents=[*parents, common], **kwargs)

    no_check = argparse.ArgumentParser(add_help=False)
    no_check.add_argument(
        "--no-check", action="store_true",
        help="skip the preflight (datasets, one image through the model) before Ray starts",
    )

    config = argparse.ArgumentParser(add_help=False)
    config.add_argument("config", help="run config (YAML)")
    config.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set fit.epochs=5 (repeatable)",
    )

    p = add(
        "check",
        parents=[config],
        help="the preflight alone: datasets, one image through the model, recipe, quick mIoU",
        description="List every dataset (images, labels; unmatched images with the folder "
        "searched, the rule and near misses), run labelled images of each through the model on "
        "this machine, check the output's channel count against model.num_classes (and "
        "model.drop_channels), the normalised input's mean and std, that predictions are not "
        "one class, and a quick pixel accuracy / mIoU against chance. Errors exit with code 2 "
        "and one line naming the cause and the fix; warnings are printed. Ray is not started.",
    )
    p.add_argument(
        "--images", type=int, default=2, metavar="N",
        help="labelled images per dataset to score (default 2; 1 for corrupted datasets)",
    )
    p.set_defaults(func=cmd_check)

    p = add(
        "run", parents=[config, no_check], help="run all stages, skipping current ones"
    )
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.add_argument("--output", metavar="DIR", help="run folder (default: the config's output)")
    p.set_defaults(func=cmd_run)

    p = add(
        "demo",
        help="CamVid + pretrained ESPNet: all stages, then the headline table",
        description="Run configs/camvid_espnet.yaml (or camvid_quick.yaml with --quick) on CamVid "
        "and the authors' ESPNet weights, found through --data/--weights or CAMVID_ROOT/"
        "SEGCAL_ESPNET_WEIGHTS, else downloaded with sha256 checks into $SEGCAL_CACHE or "
        "~/.cache/segcal (about 180 MB). Prints the headline table and the report's path.",
    )
    p.add_argument("--data", metavar="DIR", help="CamVid folder (default: $CAMVID_ROOT)")
    p.add_argument(
        "--weights", metavar="FILE", help="ESPNet weights (default: $SEGCAL_ESPNET_WEIGHTS)"
    )
    p.add_argument("--quick", action="store_true", help="the small smoke run (camvid_quick.yaml)")
    p.add_argument("--output", metavar="DIR", help="run folder (default: the config's output)")
    p.add_argument("--force", action="store_true", help="rerun every stage")
    p.set_defaults(func=cmd_demo)
    for stage, text in (
        ("extract", "stage 1: extract logits into Parquet shards"),
        ("fit", "stage 2: fit the calibrators"),
        ("evaluate", "stage 3: evaluate and aggregate metrics"),
        ("report", "write the Markdown/HTML report"),
    ):
        parents = [config, no_check] if stage == "extract" else [config]
        add(stage, parents=parents, help=text).set_defaults(func=cmd_stage)

    p = add(
        "export",
        parents=[config],
        help="write TorchScript calibrators",
        description="Write OUT/<label>.pt: (logits, image=None) -> calibrated logits; with "
        "--with-model OUT/<label>_with_model.pt: RGB image (N, 3, H, W) float in [0, 1] "
        "(uint8 / 255) -> calibrated probabilities (N, C, H, W). The config's input recipe "
        "(input_size, channel_order, scale, mean, std) is inside the file; test-time "
        "augmentation (scales, flip) is not.",
    )
    p.add_argument("--label", action="append", help="calibrator label (default: all; repeatable)")
    p.add_argument("--artifacts", help="artifact folder (default OUTPUT/artifacts)")
    p.add_argument("--out", help="output folder (default OUTPUT/export)")
    p.add_argument("--with-model", action="store_true", help="wrap the model and calibrator")
    p.set_defaults(func=cmd_export)

    from pipeline.submit import JOBS  # light: no Ray import at module level

    p = add(
        "submit",
        parents=[config],
        help="submit a stage to a Ray cluster as a Ray job",
        description="Submit `python jobs/STAGE.py CONFIG` to a Ray cluster. Arguments after "
        "`--` go to the job (e.g. `-- --registry /mnt/registry`). Uploaded: pipeline/, jobs/, "
        "pyproject.toml, the config and the files it names inside the project; never dotfiles "
        "(.env, .ray/, .aws/), secrets/, keys, data or outputs. A probe job first checks that "
        "the cluster can import segcal's dependencies; nothing is submitted when it cannot.",
    )
    p.add_argument("stage", nargs="?", default="run", choices=JOBS, help="job to run (default run)")
    p.add_argument("--address", required=True, help="dashboard URL, e.g. http://127.0.0.1:8265")
    p.add_argument("--follow", action="store_true", help="stream logs; exit with the job's status")
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="K=V",
        help="job env var (repeatable). The value is stored in the job's info: anyone who can "
        "reach the dashboard or run `ray job list` reads it. No secrets here",
    )
    p.add_argument(
        "--env-from-cluster",
        action="append",
        default=[],
        metavar="NAME",
        help="a secret by reference (repeatable): the job reads NAME from the cluster's own "
        "environment (set where `ray start` runs) and stops with exit code 2 if it is unset; "
        "its value is never sent",
    )
    p.add_argument(
        "--skip-check",
        action="store_true",
        help="skip the probe job that checks the cluster can import segcal's dependencies "
        "(and runs the job on Ray's own interpreter)",
    )
    p.set_defaults(func=cmd_submit, job_args=[])

    p = add(
        "refresh", parents=[config, no_check], help="nightly refresh with safe promotion"
    )
    p.add_argument("--registry", help="registry folder (default: refresh.registry in the config)")
    p.add_argument(
        "--allow-adaptive", action="store_true",
        help="let the target-adapted calibrators (adaptive_ts*) count in the promotion and be the "
        "run's calibrator (default: stored with the run, never chosen)",
    )
    p.add_argument(
        "--no-drift-exit", action="store_true",
        help="exit 0 when a drift alarm fires (default: exit code 4; the alarm is recorded "
        "either way)",
    )
    p.set_defaults(func=cmd_refresh)

    p = add("promote", help="point the registry's current at a stored run")
    p.add_argument("registry", help="registry folder")
    p.add_argument("run_id", help="run id (a folder name under DIR/runs)")
    p.add_argument("--reason", default="manual promotion", help="recorded in history.jsonl")
    p.set_defaults(func=cmd_promote)

    p = add("status", help="show the current champion, the last decisions and drift alarms")
    p.add_argument("registry", help="registry folder")
    p.add_argument("--last", type=int, default=10, help="decisions to show (default 10)")
    p.add_argument("--html", action="store_true",
                   help="also write REGISTRY/history.html: image-wise ECE per domain over the "
                        "decisions, promotions marked")
    p.set_defaults(func=cmd_status)
    return parser


def _add_verbosity(parser: argparse.ArgumentParser, *, default: object) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "-v", "--verbose", action="store_true", default=default,
        help="log progress (INFO) and print the full traceback of a failure",
    )
    group.add_argument(
        "-q", "--quiet", action="store_true", default=default,
        help="only warnings and errors (no preflight lines)",
    )


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a ``segcal`` command line (without the program name).

    Raises:
        SystemExit: with code 2 on a usage error (argparse prints the message).
    """
    argv = list(argv)
    # Everything after `--` belongs to the submitted job, not to us.
    job_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, job_args = argv[:cut], argv[cut + 1 :]
    parser = build_parser()
    args = parser.parse_args(argv)
    if job_args:
        if args.command != "submit":
            parser.error("arguments after `--` are only accepted by `submit`")
        args.job_args = job_args
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segcal`` console script; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING,
        format="segcal: %(levelname)s: %(message)s",
    )
    return _dispatch(args)


# A line of a formatted traceback naming an exception: "ValueError: Expected ...".
_ERROR_LINE = re.compile(r"^\s*((?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception)): \S.*$")


def root_cause(err: BaseException) -> str:
    """The original error behind ``err``, as one ``Type: message`` line.

    Follows ``__cause__`` and the ``cause`` that Ray's task errors keep; a Ray error whose
    message holds a remote traceback gives that traceback's last ``...Error: message`` line,
    so the cause reads the same whether a stage ran in this process or in a Ray worker.

    Example:
        >>> try:
        ...     raise RuntimeError("stage failed") from ValueError("Expected 11 channels")
        ... except RuntimeError as e:
        ...     root_cause(e)
        'ValueError: Expected 11 channels'
    """
    chain: list[BaseException] = []
    e: BaseException | None = err
    while e is not None and all(e is not seen for seen in chain):
        chain.append(e)
        cause = getattr(e, "cause", None)
        e = cause if isinstance(cause, BaseException) else e.__cause__
    # Innermost first: the original error; an empty message (Ray's SystemException) says
    # nothing, so look further out.
    for e in reversed(chain):
        found = [m.group(0).strip() for m in map(_ERROR_LINE.match, str(e).splitlines()) if m]
        if found:
            return found[-1]
    for e in reversed(chain):
        text = str(e).strip()
        if text:
            first = text.splitlines()[0]
            more = " ..." if len(text.splitlines()) > 1 else ""
            return f"{type(e).__name__}: {first}{more}"
    return type(err).__name__


def _write_error_log(args: argparse.Namespace, err: BaseException) -> Path | None:
    output = getattr(args, "output_dir", None)
    if not output or "://" in str(output):
        return None
    path = Path(output) / ERROR_LOG
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(traceback.format_exception(err))
        path.write_text(f"segcal {args.command} {getattr(args, 'config', '')}\n{text}")
    except OSError:
        return None
    return path


def _dispatch(args: argparse.Namespace) -> int:
    code = _run(args)
    mirror = getattr(args, "mirror", None)
    if mirror is not None:  # the output is a URI: send back what the command wrote, failed or not
        try:
            mirror.push()
        except Exception as err:
            print(f"segcal {args.command}: failed to copy {mirror.local} to {mirror.uri}: "
                  f"{root_cause(err)} (the files are still in {mirror.local}; the next command "
                  "on this machine sends them)", file=sys.stderr)
            return code or FAILED
    return code


def _run(args: argparse.Namespace) -> int:
    from pipeline.config import ConfigError
    from pipeline.preflight import PreflightError
    from pipeline.registry import RegistryError
    from pipeline.submit import SubmitError

    try:
        return args.func(args)
    except (ConfigError, UsageError) as err:
        print(f"segcal {args.command}: {err}", file=sys.stderr)
        return USAGE
    except PreflightError as err:
        print(f"segcal {args.command}: preflight: {err}", file=sys.stderr)
        return USAGE
    except (RegistryError, SubmitError) as err:
        print(f"segcal {args.command}: {err}", file=sys.stderr)
        return UNAVAILABLE
    except Exception as err:
        if args.verbose:
            traceback.print_exc()
        log = _write_error_log(args, err)
        where = [] if args.verbose else ["rerun with -v for the traceback"]
        if log is not None:
            where.append(f"traceback in {log}")
        hint = f" ({'; '.join(where)})" if where else ""
        print(f"segcal {args.command}: failed: {root_cause(err)}{hint}", file=sys.stderr)
        return FAILED


if __name__ == "__main__":
    sys.exit(main())
