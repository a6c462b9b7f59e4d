"""The preflight (``pipeline.preflight``, ``segcal check``) against each mistake a newcomer makes.

The data are tiny images of pure red, green, blue and black blocks labelled 0, 1, 2 and 3; the
``python``-kind models below (imported from this module by the adapter) score them exactly
when the input recipe is right: channel c of the normalised input is the logit of class c and
black is a constant zero logit, so a recipe that leaves every channel negative predicts black
everywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch import nn

from pipeline import cli
from pipeline import stages as stages_mod
from pipeline.config import ConfigError, parse_config
from pipeline.models import load_model
from pipeline.preflight import PreflightError, preflight, recipe_advice

COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]], np.uint8)
# A recipe that maps the lit channel to +2 and the others to -2.
GOOD = {"scale": 1 / 255, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


class _ColorNet(nn.Module):
    def __init__(self, extra: int = 0, constant: bool = False) -> None:
        super().__init__()
        self.extra, self.constant = extra, constant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.constant:  # class 0 everywhere, whatever the input
            out = torch.zeros(x.shape[0], 4, *x.shape[-2:])
            out[:, 0] = 1.0
            return out
        zero = torch.zeros_like(x[:, :1])
        void = [torch.full_like(x[:, :1], -100.0)] * self.extra
        return torch.cat([x, zero, *void], 1)


def color_net() -> nn.Module:
    """4 channels: red, green, blue, black."""
    return _ColorNet()


def color_net_void() -> nn.Module:
    """5 channels: the 4 classes, then a void channel (like ESPNet's CamVid model)."""
    return _ColorNet(extra=1)


def constant_net() -> nn.Module:
    """4 channels, class 0 on every pixel."""
    return _ColorNet(constant=True)


def _write_pair(images: Path, labels: Path, stem: str, seed: int, label_name: str) -> None:
    rng = np.random.default_rng(seed)
    blocks = rng.permutation(np.arange(16) % 4).reshape(4, 4)
    label = np.kron(blocks, np.ones((4, 4), np.int64)).astype(np.uint8)  # 16 x 16
    Image.fromarray(COLORS[label]).save(images / f"{stem}.png")
    Image.fromarray(label).save(labels / label_name.format(stem=stem))


@pytest.fixture
def data(tmp_path) -> Path:
    """tmp/images/{a,b,c}.png with labels tmp/labels/{a,b,c}.png; tmp/labels_L/{stem}_L.png."""
    for name in ("images", "labels", "labels_L"):
        (tmp_path / name).mkdir()
    for i, stem in enumerate("abc"):
        _write_pair(tmp_path / "images", tmp_path / "labels", stem, i, "{stem}.png")
        _write_pair(tmp_path / "images", tmp_path / "labels_L", stem, i, "{stem}_L.png")
    return tmp_path


def _raw(data: Path, *, model: dict | None = None, dataset: dict | None = None) -> dict:
    return {
        "output": str(data / "out"),
        "model": {
            "kind": "python", "path": "tests.test_preflight:color_net", "num_classes": 4,
            **GOOD, **(model or {}),
        },
        "datasets": [
            {
                "name": "val", "role": "calibration", "domain": "day",
                "images": str(data / "images"), "labels": str(data / "labels"),
                **(dataset or {}),
            }
        ],
    }


def _cfg(data: Path, **kw):
    return parse_config(_raw(data, **kw))


# --- the preflight itself ----------------------------------------------------------------------


def test_right_recipe_passes_without_warnings(data):
    report = preflight(_cfg(data))
    assert report.warnings == []
    assert report.channels == 4
    check = report.datasets[0]
    assert (check.listed, check.selected, check.labelled, check.scored) == (3, 3, 3, 2)
    assert check.pixel_accuracy == 1.0
    assert check.miou == 1.0
    assert any("dataset val (calibration, folder): 3 images listed" in x for x in report.lines)


def test_a_monitor_set_needs_no_labels_and_still_runs_through_the_model(data):
    raw = _raw(data)
    raw["datasets"].append({"name": "night", "role": "monitor", "domain": "night",
                            "images": str(data / "images")})
    report = preflight(parse_config(raw))
    assert report.warnings == []
    check = report.datasets[1]
    assert (check.listed, check.selected, check.labelled, check.scored) == (3, 3, 0, 2)
    assert check.pixel_accuracy is None
    assert any("dataset night (monitor, folder): 3 images listed, 3 selected, unlabelled" in x
               for x in report.lines)
    assert any("dataset night: 2 unlabelled image(s) decoded and run through the model" in x
               for x in report.lines)


def test_mean_std_in_255_units_with_scale_1_255_warns_with_the_fix(data):
    # The mistake: ImageNet mean/std given in 0-255 units, scale left at 1/255.
    cfg = _cfg(data, model={"mean": [123.675, 116.28, 103.53], "std": [58.395, 57.12, 57.375]})
    report = preflight(cfg)
    text = "\n".join(report.warnings)
    assert "mean/std look like 0-255 units" in text
    assert "divide `model.mean` and `model.std` by 255" in text
    assert "predictions near chance" in text  # black (class 3) everywhere
    assert "degenerate" in text


def test_0_1_units_with_scale_1_is_named_when_predictions_are_off(data):
    # scale 1 with 0-1 mean/std: inputs in the hundreds; a constant model makes it suspicious.
    cfg = _cfg(data, model={"scale": 1.0, "path": "tests.test_preflight:constant_net"})
    text = "\n".join(preflight(cfg).warnings)
    assert "set `model.scale: 0.00392156862745098` (1/255)" in text


def test_unusual_recipe_with_right_predictions_is_only_a_note(data):
    # Some models are trained on odd recipes (the demo's ESPNet): good predictions win.
    report = preflight(_cfg(data, model={"scale": 1.0}))
    assert report.warnings == []
    assert any("likely the model's own recipe" in x for x in report.lines)


def test_recipe_advice_for_plausible_inputs_is_none():
    cfg = parse_config(_raw(Path("/tmp"))).model
    assert recipe_advice(cfg, 0.2, 1.1) is None
    assert "far from zero" in recipe_advice(cfg, 9.0, 1.0)


def test_num_classes_too_large_is_an_error_naming_the_fix(data):
    with pytest.raises(PreflightError) as info:
        preflight(_cfg(data, model={"num_classes": 5}))
    msg = str(info.value)
    assert "\n" not in msg
    assert "color_net to output model.num_classes = 5 channels, but got 4" in msg
    assert "set `model.num_classes: 4`" in msg


def test_num_classes_too_small_blames_the_channels_not_the_labels(data):
    # The labels hold class 3, which num_classes: 3 would also refuse; the channel count is the
    # cause, so it is what the message names.
    with pytest.raises(PreflightError) as info:
        preflight(_cfg(data, model={"num_classes": 3}))
    msg = str(info.value)
    assert "model.num_classes = 3 channels, but got 4" in msg
    assert "`model.drop_channels: [3]`" in msg
    assert "`model.num_classes: 4`" in msg


def test_drop_channels_drops_exactly_those(data):
    raw = _raw(data, model={"path": "tests.test_preflight:color_net_void"})
    with pytest.raises(PreflightError, match=r"drop them with `model.drop_channels: \[4\]`"):
        preflight(parse_config(raw))
    raw["model"]["drop_channels"] = [4]
    cfg = parse_config(raw)
    report = preflight(cfg)
    assert report.warnings == []
    assert report.channels == 5
    model = load_model(cfg.model)
    images = torch.from_numpy(COLORS[None, None, :3])  # (1, 1, 3, 3): red, green, blue
    assert model(images).shape == (1, 4, 1, 3)
    assert model(images)[0].argmax(0).tolist() == [[0, 1, 2]]
    # A count that does not add up is refused by the preflight and by the model itself.
    raw["model"]["drop_channels"] = [0, 4]
    raw["model"]["num_classes"] = 4
    cfg = parse_config(raw)
    with pytest.raises(PreflightError, match=r"4 \+ 2 = 6 channels, but got 5"):
        preflight(cfg)
    with pytest.raises(ValueError, match="num_classes \\+ len\\(drop_channels\\) = 6"):
        load_model(cfg.model)(images)


def test_drop_channels_is_validated():
    raw = _raw(Path("/tmp"), model={"drop_channels": [4, 4]})
    with pytest.raises(ConfigError, match="distinct channel indices"):
        parse_config(raw)
    raw["model"]["drop_channels"] = [5]
    with pytest.raises(ConfigError, match="index the model's num_classes"):
        parse_config(raw)


def test_labels_not_found_names_folder_rule_count_and_near_misses(data):
    cfg = _cfg(data, dataset={"labels": str(data / "labels_L")})
    with pytest.raises(PreflightError) as info:
        preflight(cfg)
    msg = str(info.value)
    assert "\n" not in msg
    assert "found none for 3 of 3 images" in msg
    assert f"searched {data / 'labels_L'}" in msg
    assert "same relative path and stem as the image" in msg
    assert "near misses: a_L.png" in msg
    assert "fix: set `label_pattern: '{stem}_L.png'`" in msg


@pytest.mark.parametrize("pattern", ["{stem}_L.png", "{stem}_L"])
def test_label_pattern_finds_the_labels(data, pattern):
    cfg = _cfg(data, dataset={"labels": str(data / "labels_L"), "label_pattern": pattern})
    report = preflight(cfg)
    assert report.warnings == []
    assert report.datasets[0].labelled == 3


def test_label_pattern_keeps_the_image_subfolder(data):
    from pipeline.data import list_samples

    for name in ("images", "labels_L"):
        (data / name / "seq").mkdir()
    _write_pair(data / "images" / "seq", data / "labels_L" / "seq", "d", 7, "{stem}_L.png")
    cfg = _cfg(data, dataset={"labels": str(data / "labels_L"), "label_pattern": "{stem}_L.png",
                              "glob": "**/*.png"})
    by_id = {s.image_id: s.label_uri for s in list_samples(cfg.datasets[0])}
    assert by_id["seq/d"] == str(data / "labels_L" / "seq" / "d_L.png")


@pytest.mark.parametrize(
    ("pattern", "extra"),
    [("{name}.png", {}), ("seq/{stem}.png", {}), ("{stem}{stem}.png", {}), ("x.png", {}),
     ("{stem}.png", {"format": "manifest", "manifest": "/m.csv"})],
)
def test_bad_label_patterns_are_refused(pattern, extra):
    with pytest.raises(ConfigError, match="label_pattern"):
        parse_config(_raw(Path("/tmp"), dataset={"label_pattern": pattern, **extra}))


def test_missing_labels_with_on_error_skip_only_warn(data):
    (data / "labels" / "c.png").unlink()
    raw = _raw(data)
    raw["extract"] = {"on_error": "skip"}
    report = preflight(parse_config(raw))
    assert len(report.warnings) == 1
    assert "found none for 1 of 3 images" in report.warnings[0]
    assert "they will be skipped" in report.warnings[0]


def test_degenerate_model_warns(data):
    report = preflight(_cfg(data, model={"path": "tests.test_preflight:constant_net"}))
    text = "\n".join(report.warnings)
    assert "predicts class 0 (class_0) on 100.0% of the pixels" in text
    assert "degenerate" in text


def test_label_values_beyond_num_classes_name_the_file(data):
    Image.fromarray(np.full((16, 16), 9, np.uint8)).save(data / "labels" / "a.png")
    with pytest.raises(PreflightError, match=r"labels/a.png to lie in 0..3 or equal ignore_index"):
        preflight(_cfg(data))


def test_missing_images_folder_is_an_error(data):
    with pytest.raises(PreflightError, match="Expected `images` of dataset 'val' to be a folder"):
        preflight(_cfg(data, dataset={"images": str(data / "nope")}))


def test_model_that_does_not_load_is_one_line(data):
    with pytest.raises(PreflightError, match=r"^Cannot load model tests.test_preflight:nope"):
        preflight(_cfg(data, model={"path": "tests.test_preflight:nope"}))


# --- the CLI: `segcal check`, and the preflight before Ray starts --------------------------------


@pytest.fixture
def no_ray(monkeypatch):
    def refuse() -> None:
        raise AssertionError("Ray started")

    monkeypatch.setattr("pipeline.cli_commands._init_ray", refuse)


def _config_file(data: Path, **kw) -> Path:
    path = data / "run.yaml"
    path.write_text(yaml.safe_dump(_raw(data, **kw)))
    return path


def segcal(*argv, capsys):
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_check_command_ok(data, no_ray, capsys):
    code, out, err = segcal("check", _config_file(data), capsys=capsys)
    assert code == cli.OK
    assert "dataset val (calibration, folder): 3 images listed" in out
    assert "pixel accuracy 1.000" in out
    assert out.strip().splitlines()[-1] == "check: ok"


def test_check_command_prints_warnings(data, no_ray, capsys):
    path = _config_file(data, model={"path": "tests.test_preflight:constant_net"})
    code, out, err = segcal("check", path, capsys=capsys)
    assert code == cli.OK
    assert "segcal check: warning: dataset 'val': the model predicts class 0" in err
    assert "warning(s)" in out


@pytest.mark.parametrize("command", ["run", "extract", "refresh", "check"])
@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"model": {"num_classes": 5}}, "output model.num_classes = 5 channels, but got 4"),
        ({"model": {"num_classes": 3}}, "`model.drop_channels: [3]`"),
        ({"dataset": {"labels": "LABELS_L"}}, "fix: set `label_pattern: '{stem}_L.png'`"),
    ],
    ids=["num_classes-too-large", "num_classes-too-small", "labels-not-found"],
)
def test_mistakes_stop_before_ray_with_one_line(data, no_ray, capsys, command, kw, message):
    if "dataset" in kw:
        kw = {"dataset": {"labels": str(data / "labels_L")}}
    argv = [command, _config_file(data, **kw)]
    if command == "refresh":
        argv += ["--registry", data / "registry"]
    code, _, err = segcal(*argv, capsys=capsys)
    assert code == cli.USAGE
    assert message in err
    lines = [x for x in err.strip().splitlines() if not x.startswith("check: ")]
    assert len(lines) == 1
    assert lines[0].startswith(f"segcal {command}: preflight: ")
    assert "Traceback" not in err


def test_run_with_the_right_config_starts_ray_after_the_preflight(data, monkeypatch, capsys):
    events: list[str] = []
    monkeypatch.setattr("pipeline.cli_commands._init_ray", lambda: events.append("ray"))
    monkeypatch.setattr(stages_mod, "call_stage", lambda cfg, stage: events.append(stage))
    code, out, err = segcal("run", _config_file(data), capsys=capsys)
    assert code == cli.OK
    assert events[:2] == ["ray", "extract"]
    assert "check: dataset val" in err  # diagnostics on stderr; stdout stays the result
    assert "check:" not in out
    # -q hides the preflight's lines; --no-check skips it.
    segcal("run", _config_file(data), "-q", "--force", capsys=capsys)
    code, _, err = segcal(
        "run", _config_file(data, model={"num_classes": 5}), "--no-check", "--force",
        capsys=capsys,
    )
    assert "check:" not in err


def test_verbosity_flags_after_the_command():
    assert cli.parse_args(["run", "-v", "c.yaml"]).verbose is True
    assert cli.parse_args(["-v", "run", "c.yaml"]).verbose is True
    args = cli.parse_args(["check", "c.yaml", "-q"])
    assert (args.verbose, args.quiet) == (False, True)
    assert cli.parse_args(["status", "dir"]).verbose is False


# --- one line naming the cause when a stage fails ------------------------------------------------


class _RemoteError(Exception):
    """Stands for a Ray task error: the remote traceback in its message, the original kept."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(
            "ray::MapBatches(_ModelActor)() (pid=123, ip=127.0.0.1)\n"
            '  File "/work/main/pipeline/models/wrapper.py", line 210, in _logits\n'
            "    raise ValueError(\n"
            f"ValueError: {cause}"
        )
        self.cause = cause


def test_root_cause_finds_the_original_error():
    inner = ValueError("Expected model `m` to output at least num_classes=12 channels, but got 11")
    wrapped = RuntimeError("stage extract failed")
    wrapped.__cause__ = _RemoteError(inner)
    assert cli.root_cause(wrapped) == f"ValueError: {inner}"
    died = RuntimeError(
        "The actor died because of an error raised in its creation task\n  File ...\n"
        "ModuleNotFoundError: No module named 'timm'"
    )
    assert cli.root_cause(died) == "ModuleNotFoundError: No module named 'timm'"
    assert cli.root_cause(KeyError()) == "KeyError"


@pytest.mark.parametrize("verbose", [False, True])
def test_stage_failure_is_one_line_traceback_only_with_v(data, monkeypatch, capsys, verbose):
    monkeypatch.setattr("pipeline.cli_commands._init_ray", lambda: None)

    def fail(cfg, stage):
        inner = ValueError("Expected finite logits from model `m`, but got 3 NaN/inf values")
        raise RuntimeError("Ray Data execution failed") from _RemoteError(inner)

    monkeypatch.setattr(stages_mod, "call_stage", fail)
    argv = ["extract", _config_file(data), "--no-check"] + (["-v"] if verbose else [])
    code, _, err = segcal(*argv, capsys=capsys)
    assert code == cli.FAILED
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "segcal extract: failed: ValueError: Expected finite logits from model `m`, but got 3"
    )
    assert f"traceback in {data / 'out' / 'error.log'}" in last
    assert ("Traceback" in err) is verbose
    assert "rerun with -v" in last or verbose
    assert "Ray Data execution failed" in (data / "out" / "error.log").read_text()


def test_importing_the_preflight_is_light():
    # The CLI imports it for every command (to catch PreflightError), `segcal status` included.
    import subprocess
    import sys

    code = "import sys, pipeline.preflight; print('torch' in sys.modules, 'ray' in sys.modules)"
    root = Path(cli.__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root)
    assert out.stdout.split() == ["False", "False"]


def test_run_output_option(data, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr("pipeline.cli_commands._init_ray", lambda: None)
    monkeypatch.setattr(stages_mod, "call_stage", lambda cfg, stage: None)
    monkeypatch.chdir(tmp_path)
    code, out, _ = segcal("run", _config_file(data), "--output", "elsewhere", "-q", capsys=capsys)
    assert code == cli.OK
    assert out.strip().splitlines()[-1] == str(tmp_path / "elsewhere" / "report.html")
