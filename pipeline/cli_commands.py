"""The ``segcal`` commands: the ``cmd_*`` functions that :mod:`pipeline.cli` dispatches to.

Each takes the parsed arguments and returns an exit code (:data:`OK`, ... :data:`DRIFT`; the
table is in :mod:`pipeline.cli`'s docstring), or raises: :class:`UsageError` for bad arguments
that argparse cannot see, or the error of the stage, registry or cluster, which
:mod:`pipeline.cli` turns into one line and an exit code. The helpers shared by the commands
are here too: loading the config (``--set`` overrides), the preflight before Ray starts, Ray
itself, and the lines a refresh decision and a registry status print.

Every stage, model, Ray and registry import happens inside the command that needs it, so
``segcal --help`` imports none of them.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.paths import REPORT_HTML

if TYPE_CHECKING:
    from pipeline.config import JobConfig

# The exit codes (pipeline.cli re-exports them with the table that explains each).
OK, FAILED, USAGE, UNAVAILABLE, DRIFT = 0, 1, 2, 3, 4
RAY_STAGES = ("extract", "fit", "evaluate")

logger = logging.getLogger("segcal")


class UsageError(Exception):
    """Bad arguments that argparse cannot see (exit code 2)."""


# --- helpers -----------------------------------------------------------------------------------


def _load(args: argparse.Namespace, *, mirror: bool = True) -> JobConfig:
    """The config of ``args``; with ``mirror``, an ``output`` URI becomes its local mirror.

    Then the run works in the mirror, pulled from the URI here; :func:`pipeline.cli._dispatch`
    pushes it back when the command ends (see :mod:`pipeline.storage`).
    """
    from pipeline.config import load_config
    from pipeline.storage import Mirror, is_uri

    cfg = load_config(args.config, args.overrides)
    if mirror and is_uri(cfg.output):
        args.mirror = Mirror(cfg.output)
        cfg = cfg.model_copy(update={"output": str(args.mirror.pull()), "store": cfg.output})
    args.output_dir = cfg.output  # where a failure's traceback goes (error.log)
    return cfg


def _output_override(output: str) -> str:
    """``--output``: a URI as given, a local folder resolved against the working directory."""
    from pipeline.storage import is_uri

    return f"output={output if is_uri(output) else Path(output).resolve()}"


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
        args.overrides = [*args.overrides, _output_override(args.output)]
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
    args.overrides = [_output_override(args.output)] if args.output else []
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

    cfg = _load(args, mirror=False)
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

        from pipeline.calibrators.export import InputRecipe
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
    from pipeline.storage import is_uri
    from pipeline.submit import PROJECT_ROOT, check_address, submit

    try:
        check_address(args.address)
    except ValueError as err:
        raise UsageError(str(err)) from None
    # Fail here, with the file and key named, rather than on the cluster.
    cfg = _load(args, mirror=False)
    if not is_uri(cfg.output) and Path(cfg.output).resolve().is_relative_to(PROJECT_ROOT):
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
