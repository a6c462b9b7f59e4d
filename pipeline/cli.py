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
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.paths import ERROR_LOG, REPORT_HTML

if TYPE_CHECKING:
    from pipeline.config import JobConfig

OK, FAILED, USAGE, UNAVAILABLE, DRIFT = 0, 1, 2, 3, 4
RAY_STAGES = ("extract", "fit", "evaluate")

logger = logging.getLogger("segcal")


class UsageError(Exception):
    """Bad arguments that argparse cannot see (exit code 2)."""


# --- helpers -----------------------------------------------------------------------------------


def _load(args: argparse.Namespace) -> JobConfig:
    from pipeline.config import load_config

    cfg = load_config(args.config, args.overrides)
    args.output_dir = cfg.output  # where a failure's traceback goes (error.log)
    return cfg


def _preflight(args: argparse.Namespace, cfg: JobConfig) -> None:
    """Run the preflight unless ``--no-check``; print its lines (not with -q) and warnings.

    Raises:
        PreflightError: a mistake that would fail the run (printed as one line, exit code 2).
    """
    if getattr(args, "no_check", False):
        return
    from pipeline.preflight import preflight

    quiet = getattr(args, "quiet", False)
    # On stderr: stdout stays the command's result (the report path, the decision).
    echo = None if quiet else (lambda line: print(f"check: {line}", file=sys.stderr, flush=True))
    # One image per dataset here (`segcal check --images N` scores more): a rerun with nothing
    # to do should not wait on the model.
    report = preflight(cfg, images_per_dataset=1, echo=echo)
    for warning in report.warnings:
        print(f"segcal {args.command}: warning: {warning}", file=sys.stderr)


def _init_ray() -> None:
    from pipeline.runtime import init_ray

    # RAY_ADDRESS set (inside a Ray job it is): join that cluster; else a local runtime on
    # 127.0.0.1 only (SEGCAL_RAY_BIND=all for every interface).
    init_ray()


def _print_decision(entry: dict) -> None:
    print(f"{entry['decision']}: {entry.get('challenger')} ({entry['reason']})")
    for row in entry.get("comparisons") or []:
        chall = "missing" if row["challenger"] is None else f"{row['challenger']:.4f}"
        mark = "ok" if row["ok"] else "WORSE"
        where = f"{row['dataset']}/{row['calibrator']}"
        print(f"  {where:<40} {row['champion']:.4f} -> {chall} {mark}")
    print(f"current: {entry.get('current')}")
    for line in label_free_lines(entry):
        print(line)


def _cell(value: object, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def label_free_lines(entry: dict) -> list[str]:
    """A history entry's drift alarms and label-free estimates, one line per set.

    Empty when the entry recorded none (no ``label_free.csv`` that night, or an older entry).
    """
    record = entry.get("label_free")
    if not isinstance(record, dict):
        return []
    sets = record.get("sets") or []
    alarms = record.get("alarms") or []
    calibrator = record.get("calibrator")
    head = (f"drift alarm on {len(alarms)} of {len(sets)} sets: {', '.join(alarms)}" if alarms
            else f"drift alarm on none of {len(sets)} sets")
    lines = [f"{head}; estimates of {calibrator or 'no calibrator (not measured)'}"]
    lines.append(f"  {'set':<24} {'role':<8} {'drift/threshold':>15} {'alarm':<5} "
                 f"{'acc ATC':>7} {'DoC':>6} {'true':>6} {'imgECE':>7} {'true':>6}")
    for s in sets:
        drift = f"{_cell(s.get('drift_score'))}/{_cell(s.get('drift_threshold'))}"
        alarm = {True: "ALARM", False: "ok"}.get(s.get("drift_alarm"), "–")
        lines.append(
            f"  {str(s.get('dataset')):<24} {str(s.get('role') or '–'):<8} {drift:>15} "
            f"{alarm:<5} {_cell(s.get('est_pixel_acc')):>7} {_cell(s.get('est_pixel_acc_doc')):>6} "
            f"{_cell(s.get('true_pixel_acc')):>6} {_cell(s.get('est_img_ece'), 4):>7} "
            f"{_cell(s.get('true_img_ece'), 4):>6}"
        )
    return lines


# --- commands ----------------------------------------------------------------------------------


def _run_all(args: argparse.Namespace) -> Path:
    """Run every stage of ``args.config``, skipping current ones; returns the output folder."""
    from pipeline.stages import STAGES, run_stages

    cfg = _load(args)
    if args.command != "demo":  # the demo's shipped config is known good
        _preflight(args, cfg)
    _init_ray()
    ran = run_stages(cfg, STAGES, force=args.force)
    for stage, did in ran.items():
        print(f"{stage}: {'ran' if did else 'current, skipped'}")
    return Path(cfg.output)


def cmd_run(args: argparse.Namespace) -> int:
    if args.output:  # resolved here: relative to the working directory, not to the config
        args.overrides = [*args.overrides, f"output={Path(args.output).resolve()}"]
    print(_run_all(args) / REPORT_HTML)
    return OK


def cmd_demo(args: argparse.Namespace) -> int:
    from pipeline import demo

    args.config = demo.config_path(quick=args.quick)  # before a long download, not after
    # Download progress is worth seeing without -v.
    logging.getLogger(demo.__name__).setLevel(logging.INFO)
    data = demo.ensure_camvid(args.data or os.environ.get("CAMVID_ROOT"))
    weights = demo.ensure_espnet_weights(args.weights or os.environ.get("SEGCAL_ESPNET_WEIGHTS"))
    # The demo configs read both through ${CAMVID_ROOT:-...} / ${SEGCAL_ESPNET_WEIGHTS:-...}.
    os.environ["CAMVID_ROOT"], os.environ["SEGCAL_ESPNET_WEIGHTS"] = str(data), str(weights)
    args.overrides = [f"output={Path(args.output).resolve()}"] if args.output else []
    output = _run_all(args)
    print()
    print(demo.headline_table(output))
    print(f"\nreport: {output / 'report.html'} (tables: summary.csv, best.csv in {output})")
    return OK


def cmd_stage(args: argparse.Namespace) -> int:
    from pipeline.stages import run_stages

    cfg = _load(args)
    if args.command == "extract":  # the only stage that reads the data and runs the model
        _preflight(args, cfg)
    if args.command in RAY_STAGES:
        _init_ray()
    run_stages(cfg, [args.command], force=True)
    return OK


def cmd_check(args: argparse.Namespace) -> int:
    from pipeline.preflight import preflight

    cfg = _load(args)
    report = preflight(cfg, images_per_dataset=args.images, echo=print)
    for warning in report.warnings:
        print(f"segcal check: warning: {warning}", file=sys.stderr)
    print(f"check: {'ok' if not report.warnings else f'{len(report.warnings)} warning(s)'}")
    return OK


def cmd_export(args: argparse.Namespace) -> int:
    from pipeline import calibrators
    from pipeline.config import check_name

    cfg = _load(args)
    root = Path(args.artifacts) if args.artifacts else Path(cfg.output) / "artifacts"
    labels = args.label or [s.key for s in cfg.calibrators]
    for label in labels:  # each becomes a file name in the export folder
        try:
            check_name("--label", label)
        except ValueError as err:
            raise UsageError(str(err)) from None
    missing = [label for label in labels if not (root / label).is_dir()]
    if missing:
        raise UsageError(f"No fitted calibrator {missing} in {root}; run `segcal fit` first")
    out = Path(args.out) if args.out else Path(cfg.output) / "export"
    out.mkdir(parents=True, exist_ok=True)
    net = None
    if args.with_model:
        import torch

        from pipeline.calibrators.artifacts import InputRecipe
        from pipeline.models import load_model

        # The bare network behind the config's input recipe, which the file applies itself:
        # it takes RGB images in [0, 1], as spatial calibrators do in the pipeline.
        m = cfg.model
        net = load_model(m).net
        recipe = InputRecipe(m.input_size, m.channel_order, m.scale, m.mean, m.std)
        # Only used when the network cannot be scripted (e.g. transformers models): traced at
        # the network's input size.
        example = torch.rand(1, 3, *(m.input_size or (256, 256)))
        if len(m.scales) > 1 or m.flip:
            logger.warning(
                "model.scales %s / model.flip %s: the exported file runs the model once, at "
                "scale 1 without flipping (test-time augmentation is not exported)",
                m.scales, m.flip,
            )
    for label in labels:
        calibrator = calibrators.load(root / label)
        if net is None:
            path = calibrators.export_torchscript(calibrator, out / f"{label}.pt")
        else:
            path = calibrators.export_with_model(
                net, calibrator, out / f"{label}_with_model.pt", num_classes=m.num_classes,
                example_input=example, preprocess=recipe, output_index=m.output_index,
            )
        print(path)
    return OK


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.submit import PROJECT_ROOT, check_address, submit

    try:
        check_address(args.address)
    except ValueError as err:
        raise UsageError(str(err)) from None
    cfg = _load(args)  # fail here, with the file and key named, rather than on the cluster
    if Path(cfg.output).resolve().is_relative_to(PROJECT_ROOT):
        logger.warning(
            "output %s is inside the project folder: on a cluster it resolves inside the job's "
            "temporary copy of the project and is lost; use shared storage, e.g. "
            "--set output=/mnt/segcal/runs/NAME",
            cfg.output,
        )
    env = dict(_split_env(item) for item in args.env)
    for name in args.env_from_cluster:
        if not _ENV_NAME.fullmatch(name):
            raise UsageError(
                f"Expected `--env-from-cluster` to be a variable name, but got {name!r}"
            )
        if name in env:
            raise UsageError(f"`{name}` is given by both --env and --env-from-cluster; pick one")
    for key in env:
        if _SECRET_KEY.search(key):
            logger.warning(
                "--env %s: values passed with --env are stored in the job's info and shown to "
                "anyone who can reach the dashboard or run `ray job list`; for a secret, set it "
                "in the cluster's environment and pass --env-from-cluster %s instead",
                key,
                key,
            )
    job_args = [a for kv in args.overrides for a in ("--set", kv)] + args.job_args
    _, code = submit(
        args.address,
        args.stage,
        args.config,
        args=job_args,
        env=env,
        require_env=args.env_from_cluster,
        cfg=cfg,
        check=not args.skip_check,
        follow=args.follow,
    )
    return code


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SECRET_KEY = re.compile(r"TOKEN|SECRET|PASSW|CREDENTIAL|PRIVATE|API_?KEY|ACCESS_?KEY", re.I)


def _split_env(item: str) -> tuple[str, str]:
    key, sep, value = item.partition("=")
    if not sep or not _ENV_NAME.fullmatch(key):
        raise UsageError(f"Expected `--env` to be KEY=VALUE, but got {item!r}")
    return key, value


def cmd_refresh(args: argparse.Namespace) -> int:
    from pipeline.refresh import refresh

    cfg = _load(args)
    root = args.registry or cfg.refresh.registry
    if not root:
        raise UsageError("Expected a registry: pass --registry DIR or set refresh.registry")
    _preflight(args, cfg)
    _init_ray()
    entry = refresh(cfg, root, allow_adaptive=args.allow_adaptive)
    _print_decision(entry)
    if entry.get("drift_alarm") and not args.no_drift_exit:
        print(f"segcal refresh: drift alarm on {', '.join(entry['label_free']['alarms'])} "
              f"(exit code {DRIFT}; the decision above stands)", file=sys.stderr)
        return DRIFT
    return OK


def cmd_promote(args: argparse.Namespace) -> int:
    from pipeline import registry

    if not Path(args.registry).is_dir():
        raise UsageError(f"No registry at {args.registry}")
    with registry.lock(args.registry) as root:
        registry.run_dir(root, args.run_id)  # refuse an unknown run before touching anything
        try:
            previous = registry.current(root)
        except registry.RegistryError as err:
            previous = f"broken ({err})"  # promoting by hand is how a broken current is fixed
        registry.switch(root, args.run_id)
        registry.record(
            root,
            {
                "action": "promote",
                "decision": "promoted",
                "champion": previous,
                "challenger": args.run_id,
                "current": args.run_id,
                "reason": args.reason,
            },
        )
    print(f"current: {args.run_id} (was {previous})")
    return OK


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline import registry

    root = Path(args.registry)
    if not root.is_dir():
        raise UsageError(f"No registry at {root}")
    code = OK
    try:
        champion = registry.current(root)
    except registry.RegistryError as err:
        print(f"current: BROKEN: {err}")
        champion, code = None, UNAVAILABLE
    else:
        if champion is None:
            print("current: none (nothing promoted yet)")
        else:
            meta = registry.run_meta(root, champion)
            print(
                f"current: {champion} (created {meta.get('created')}, config {meta.get('config')})"
            )
    print(f"runs: {len(registry.list_runs(root))}")
    entries = registry.history(root)
    for entry in entries[-args.last:] if args.last else entries:
        print(
            f"{entry.get('time')}  {entry.get('action')!s:<8} {entry.get('decision')!s:<9} "
            f"{entry.get('challenger')}  {entry.get('reason')}"
        )
    checked = [e for e in entries if isinstance(e.get("label_free"), dict)]
    if checked:
        print(f"last label-free check: {checked[-1].get('time')} ({checked[-1].get('decision')})")
        for line in label_free_lines(checked[-1]):
            print(line)
    if args.html:
        from pipeline import report_history

        print(f"history page: {report_history.write(root)}")
    return code


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
        help="let the target-adapted calibrators (adaptive*) count in the promotion and be the "
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
