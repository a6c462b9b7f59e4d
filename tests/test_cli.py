"""The ``segcal`` CLI: help, exit codes, incremental ``run``, and the registry commands.

Stages are replaced by fakes (``pipeline.stages.call_stage``) so these tests exercise the CLI's
own logic; tests/test_e2e_cluster.py runs the real stages through a real cluster.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from pipeline import cli, registry
from pipeline import stages as stages_mod

COMMANDS = [
    "run",
    "demo",
    "extract",
    "fit",
    "evaluate",
    "report",
    "export",
    "submit",
    "refresh",
    "promote",
    "status",
]


class FakeStages:
    """fit writes each calibrator's ``ece`` (from ``self.ece``); evaluate reports it back."""

    def __init__(self):
        self.ece = 0.05
        self.calls: list[str] = []
        self.fail: str | None = None

    def __call__(self, cfg, stage):
        out = Path(cfg.output)
        self.calls.append(stage if out.name == "out" else f"{out.name}:{stage}")
        if stage == self.fail:
            raise RuntimeError(f"{stage} exploded")
        if stage == "fit":
            for spec in cfg.calibrators:
                (out / "artifacts" / spec.key).mkdir(parents=True, exist_ok=True)
                card = {"name": spec.name, "ece": self.ece}
                (out / "artifacts" / spec.key / "calibrator.json").write_text(json.dumps(card))
        elif stage == "evaluate":
            rows = []
            for spec in cfg.calibrators:
                card = json.loads((out / "artifacts" / spec.key / "calibrator.json").read_text())
                rows.append({"dataset": "dusk", "calibrator": spec.key, "img_ece": card["ece"]})
            pd.DataFrame(rows).to_csv(out / "summary.csv", index=False)
        elif stage == "report":
            (out / "report.html").write_text("<html></html>")


@pytest.fixture
def stages(monkeypatch):
    fake = FakeStages()
    monkeypatch.setattr(stages_mod, "call_stage", fake)
    monkeypatch.setattr("pipeline.cli_commands._init_ray", lambda: None)
    return fake


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "output": "out",
                "model": {
                    "kind": "python",
                    "path": "tests.extract_helpers:tiny_net",
                    "num_classes": 4,
                },
                "datasets": [],
                "calibrators": [{"name": "temperature", "label": "ts"}],
            }
        )
    )
    return path


def segcal(*argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# --- help and usage ----------------------------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    assert f"usage: segcal {command}" in capsys.readouterr().out


def test_help_imports_no_heavy_modules():
    # `segcal --help` must stay fast: no Ray, torch or stage module at import time.
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = ('ray', 'torch', 'pandas', 'pipeline.config')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_console_script_is_installed():
    exe = Path(sys.executable).with_name("segcal")
    proc = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    assert all(c in proc.stdout for c in COMMANDS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["run", "{missing}"], "Cannot read config", id="missing-config"),
        pytest.param(
            ["run", "{config}", "--set", "bogus=1"], "bogus: unknown key", id="unknown-key"
        ),
        pytest.param(["run", "{config}", "--set", "fit.epochs=many"], "fit.epochs", id="bad-type"),
        pytest.param(["run", "{config}", "--set", "noequals"], "key=value", id="bad-override"),
        pytest.param(
            ["run", "{config}", "--set", "glob=**/*.png"], "is not valid YAML", id="override-yaml"
        ),
        pytest.param(["run", "{config}", "--set", "output=${{SEGCAL_NOPE_UNSET}}/x"],
                     "${SEGCAL_NOPE_UNSET} is not set", id="unset-variable"),
        pytest.param(["export", "{config}", "--label", "../ts"], "`--label`", id="export-label"),
        pytest.param(["refresh", "{config}"], "Expected a registry", id="no-registry"),
        pytest.param(["status", "{missing}"], "No registry at", id="status-no-registry"),
        pytest.param(["promote", "{missing}", "x"], "No registry at", id="promote-no-registry"),
        pytest.param(["export", "{config}"], "No fitted calibrator", id="export-unfitted"),
        pytest.param(
            ["submit", "{config}", "--address", "127.0.0.1:8265"], "dashboard URL", id="bad-address"
        ),
        pytest.param(
            ["submit", "{config}", "--address", "http://h:1", "--env", "NOVALUE"],
            "KEY=VALUE",
            id="bad-env",
        ),
    ],
)
def test_usage_errors_exit_2(argv, message, config, tmp_path, stages, capsys):
    argv = [a.format(config=config, missing=tmp_path / "missing") for a in argv]
    code, _, err = segcal(*argv, capsys=capsys)
    assert code == cli.USAGE
    assert message in err
    assert stages.calls == []


def test_override_that_is_not_yaml_is_one_line_without_traceback(config, stages, capsys):
    # Issue 19: `--set 'glob=**/*.png'` gave a YAML traceback and exit code 1.
    code, _, err = segcal("run", config, "--set", "glob=**/*.png", capsys=capsys)
    assert code == cli.USAGE
    assert "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert """quote it, e.g. --set 'glob="**/*.png"'""" in err
    assert stages.calls == []


def test_plain_calibrator_names_run(config, stages, capsys):
    # Issue 18 item 6: `calibrators: [temperature, selective]`.
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "calibrators": ["temperature", "selective"]}))
    code, _, _ = segcal("run", config, capsys=capsys)
    assert code == cli.OK
    assert sorted(p.name for p in (config.parent / "out" / "artifacts").iterdir()) == [
        "selective", "temperature"
    ]


def test_job_arguments_only_for_submit(config, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["run", str(config), "--", "--registry", "x"])
    assert exc.value.code == cli.USAGE
    assert "only accepted by `submit`" in capsys.readouterr().err


# --- run and single stages ---------------------------------------------------------------------


def test_run_skips_current_stages(config, stages, capsys):
    code, out, _ = segcal("run", config, capsys=capsys)
    assert code == cli.OK
    assert stages.calls == ["extract", "fit", "evaluate", "report"]
    assert out.strip().splitlines()[-1] == str(config.parent / "out" / "report.html")

    stages.calls.clear()
    code, out, _ = segcal("run", config, capsys=capsys)
    assert code == cli.OK
    assert stages.calls == ["extract"]  # extract is incremental by itself; the rest is current
    assert "fit: current, skipped" in out

    stages.calls.clear()
    segcal("run", config, "--set", "fit.epochs=3", capsys=capsys)
    assert stages.calls == ["extract", "fit", "evaluate", "report"]  # config changed

    stages.calls.clear()
    (config.parent / "out" / "summary.csv").unlink()
    segcal("run", config, "--set", "fit.epochs=3", capsys=capsys)
    # A missing output reruns its stage; the same tables again leave the report current.
    assert stages.calls == ["extract", "evaluate"]

    stages.calls.clear()
    segcal("run", config, "--set", "fit.epochs=3", "--force", capsys=capsys)
    assert stages.calls == ["extract", "fit", "evaluate", "report"]


def test_run_stage_failure_exits_1(config, stages, capsys):
    stages.fail = "fit"
    code, _, err = segcal("run", config, capsys=capsys)
    assert code == cli.FAILED
    assert "segcal run: failed: RuntimeError: fit exploded" in err
    assert stages.calls == ["extract", "fit"]
    stages.fail = None
    stages.calls.clear()
    segcal("run", config, capsys=capsys)
    assert stages.calls == ["extract", "fit", "evaluate", "report"]  # the failed fit left no stamp


def test_single_stage_always_runs(config, stages, capsys):
    segcal("run", config, capsys=capsys)
    stages.calls.clear()
    assert segcal("fit", config, capsys=capsys)[0] == cli.OK
    assert stages.calls == ["fit"]


# --- refresh, promote, status ------------------------------------------------------------------


def test_refresh_promote_status_roundtrip(config, stages, tmp_path, capsys):
    reg = tmp_path / "reg"
    code, out, _ = segcal("refresh", config, "--registry", reg, capsys=capsys)
    assert code == cli.OK
    assert out.startswith("promoted: ")
    first = registry.current(reg)

    stages.ece = 0.09  # worse than the champion by far more than the tolerance
    code, out, _ = segcal(
        "refresh", config, "--registry", reg, "--set", "fit.seed=1", capsys=capsys
    )
    assert code == cli.OK
    assert out.startswith("kept: ")
    assert "dusk/ts" in out
    assert "0.0500 -> 0.0900 WORSE" in out
    assert registry.current(reg) == first
    second = next(r for r in registry.list_runs(reg) if r != first)

    code, out, _ = segcal("promote", reg, second, "--reason", "ops override", capsys=capsys)
    assert code == cli.OK
    assert registry.current(reg) == second
    assert registry.history(reg)[-1]["reason"] == "ops override"

    code, out, _ = segcal("status", reg, "--last", "2", capsys=capsys)
    assert code == cli.OK
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"current: {second}")
    assert lines[1] == "runs: 2"
    assert len(lines) == 4
    assert "refresh  kept" in lines[2]
    assert "ops override" in lines[3]

    code, out, err = segcal("status", reg, "--html", capsys=capsys)
    assert code == cli.OK, err
    page = reg / "history.html"
    assert out.strip().splitlines()[-1] == f"history page: {page}"
    assert "promoted" in page.read_text()


def test_promote_unknown_run_exits_3(config, stages, tmp_path, capsys):
    reg = tmp_path / "reg"
    segcal("refresh", config, "--registry", reg, capsys=capsys)
    before = registry.current(reg)
    code, _, err = segcal("promote", reg, "20990101T000000Z-nope", capsys=capsys)
    assert code == cli.UNAVAILABLE
    assert "has no run '20990101T000000Z-nope'" in err
    assert registry.current(reg) == before


def test_broken_current(config, stages, tmp_path, capsys):
    reg = tmp_path / "reg"
    segcal("refresh", config, "--registry", reg, capsys=capsys)
    champion = registry.current(reg)
    (reg / "runs" / champion).rename(reg / "runs" / ".moved")

    code, out, _ = segcal("status", reg, capsys=capsys)
    assert code == cli.UNAVAILABLE
    assert out.startswith("current: BROKEN: ")

    stages.calls.clear()
    code, _, err = segcal("refresh", config, "--registry", reg, capsys=capsys)
    assert code == cli.UNAVAILABLE
    assert "current is broken" in err
    assert stages.calls == []

    (reg / "runs" / ".moved").rename(reg / "runs" / champion)
    assert segcal("status", reg, capsys=capsys)[0] == cli.OK


def test_status_of_empty_registry(tmp_path, capsys):
    (tmp_path / "reg").mkdir()
    code, out, _ = segcal("status", tmp_path / "reg", capsys=capsys)
    assert code == cli.OK
    assert out.splitlines()[0] == "current: none (nothing promoted yet)"


def test_refresh_while_locked_exits_3(config, stages, tmp_path, capsys):
    with registry.lock(tmp_path / "reg"):
        code, _, err = segcal("refresh", config, "--registry", tmp_path / "reg", capsys=capsys)
    assert code == cli.UNAVAILABLE
    assert "locked by another refresh" in err


def test_refresh_uses_registry_from_config(config, stages, tmp_path, capsys):
    code, _, _ = segcal("refresh", config, "--set", "refresh.registry=reg", capsys=capsys)
    assert code == cli.OK
    assert registry.current(config.parent / "reg") is not None


# --- submit ------------------------------------------------------------------------------------


def test_submit_unreachable_exits_3(config, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = segcal("submit", config, "--address", f"http://127.0.0.1:{port}", capsys=capsys)
    assert code == cli.UNAVAILABLE
    assert f"Cannot reach the Ray job server at http://127.0.0.1:{port}" in err


def test_submit_passes_overrides_and_job_args(config, monkeypatch, capsys):
    seen = {}

    def fake_submit(address, stage, config, *, args, env, follow, require_env, cfg, check):
        seen.update(address=address, stage=stage, args=args, env=env, follow=follow)
        seen.update(require_env=require_env, check=check, epochs=cfg.fit.epochs)
        return "raysubmit_1", 7

    monkeypatch.setattr("pipeline.submit.submit", fake_submit)
    code, _, _ = segcal(
        "submit",
        config,
        "refresh",
        "--address",
        "http://h:8265",
        "--follow",
        "--env",
        "A=1=2",
        "--env-from-cluster",
        "DB_PASSWORD",
        "--skip-check",
        "--set",
        "fit.epochs=2",
        "--",
        "--registry",
        "/r",
        capsys=capsys,
    )
    assert code == 7  # the job's own exit code
    assert seen == {
        "address": "http://h:8265",
        "stage": "refresh",
        "args": ["--set", "fit.epochs=2", "--registry", "/r"],
        "env": {"A": "1=2"},
        "follow": True,
        "require_env": ["DB_PASSWORD"],
        "check": False,
        "epochs": 2,
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        pytest.param(["--env", "NOEQUALS"], "Expected `--env` to be KEY=VALUE", id="env"),
        pytest.param(["--env-from-cluster", "A B"], "to be a variable name", id="bad-name"),
        pytest.param(["--env", "T=1", "--env-from-cluster", "T"], "both --env", id="both"),
    ],
)
def test_submit_env_usage_errors(config, monkeypatch, capsys, argv, message):
    monkeypatch.setattr("pipeline.submit.submit", lambda *a, **k: pytest.fail("submitted"))
    code, _, err = segcal("submit", config, "--address", "http://h:8265", *argv, capsys=capsys)
    assert code == cli.USAGE
    assert message in err


def test_submit_warns_about_secrets_in_env(config, monkeypatch, caplog, capsys):
    monkeypatch.setattr("pipeline.submit.submit", lambda *a, **k: ("raysubmit_1", 0))
    segcal("submit", config, "--address", "http://h:8265", "--env", "API_TOKEN=x", capsys=capsys)
    assert "--env API_TOKEN: values passed with --env are stored in the job's info" in caplog.text
    assert "--env-from-cluster API_TOKEN" in caplog.text


def test_submit_warns_about_output_inside_project(config, monkeypatch, caplog, capsys):
    monkeypatch.setattr("pipeline.submit.submit", lambda *a, **k: ("raysubmit_1", 0))
    inside = Path(cli.__file__).resolve().parents[1] / "runs" / "x"
    segcal(
        "submit", config, "--address", "http://h:8265", "--set", f"output={inside}", capsys=capsys
    )
    assert "is inside the project folder" in caplog.text
    caplog.clear()
    segcal("submit", config, "--address", "http://h:8265", capsys=capsys)
    assert "inside the project folder" not in caplog.text


def _args_after(text: str, word: str) -> list[str]:
    # The segcal arguments of a shipped command line: after `word`, before any redirection.
    return shlex.split(text.split(word, 1)[1].split(">>")[0])


def _shipped_commands() -> dict[str, list[str]]:
    root = Path(cli.__file__).resolve().parents[1] / "deploy"
    cron = next(line for line in (root / "crontab").read_text().splitlines() if line[:1].isdigit())
    unit = (root / "segcal-refresh.service").read_text().replace("\\\n", " ")
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    entrypoint = yaml.safe_load((root / "rayjob.yaml").read_text())["spec"]["entrypoint"]
    return {
        "crontab": _args_after(cron, "bin/segcal"),
        "systemd": _args_after(exec_start, "bin/segcal"),
        "rayjob": ["refresh", *_args_after(entrypoint, "jobs/refresh.py")],
    }


@pytest.mark.parametrize("where", ["crontab", "systemd", "rayjob"])
def test_shipped_schedules_are_valid_commands(where):
    args = cli.parse_args(_shipped_commands()[where])
    if where == "rayjob":  # runs jobs/refresh.py on the cluster directly
        assert args.command == "refresh"
        assert args.registry == "/mnt/segcal/registry"
    else:
        assert (args.command, args.stage, args.follow) == ("submit", "refresh", True)
        assert args.address == "http://127.0.0.1:8265"
        assert args.job_args == ["--registry", "/mnt/segcal/registry"]
    assert args.config == "configs/camvid_espnet.yaml" or args.config.endswith(
        "/configs/camvid_espnet.yaml"
    )
    assert "output=/mnt/segcal/runs/nightly" in args.overrides


def test_jobs_delegate_to_the_cli(config, tmp_path):
    # A job script run as `ray job submit` runs it: same parsing, same exit codes.
    root = Path(cli.__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    proc = subprocess.run(
        [sys.executable, root / "jobs" / "run.py", config, "--set", "bogus=1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == cli.USAGE
    assert "bogus: unknown key" in proc.stderr


# --- export ------------------------------------------------------------------------------------


@pytest.fixture
def fitted(config):
    import torch

    from pipeline import calibrators

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 4, generator=g) * 4
    labels = torch.randint(0, 4, (64,), generator=g)
    ts = calibrators.build_calibrator("temperature", 4).fit(logits, labels)
    calibrators.save(
        ts, config.parent / "out" / "artifacts" / "ts", class_names=None, ignore_index=255
    )
    return ts


def test_export_calibrator(config, fitted, capsys):
    import torch

    code, out, _ = segcal("export", config, capsys=capsys)
    assert code == cli.OK
    path = config.parent / "out" / "export" / "ts.pt"
    assert out.strip() == str(path)
    logits = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(torch.jit.load(path)(logits, None), fitted(logits))


def test_export_with_model(config, fitted, tmp_path, capsys):
    import torch
    import torch.nn.functional as F

    from tests.extract_helpers import tiny_net

    code, out, _ = segcal("export", config, "--with-model", "--out", tmp_path / "x", capsys=capsys)
    assert code == cli.OK
    x = torch.rand(1, 3, 8, 10)
    expected = torch.softmax(
        fitted(F.interpolate(tiny_net()(x), size=(8, 10), mode="bilinear", align_corners=False)), 1
    )
    torch.testing.assert_close(torch.jit.load(tmp_path / "x" / "ts_with_model.pt")(x), expected)
