from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, config_hash, load_config, parse_config

BASE = {
    "output": "runs/x",
    "model": {"kind": "espnet", "path": "w.pth", "num_classes": 3},
    "datasets": [
        {"name": "cal", "role": "calibration", "domain": "day", "images": "im", "labels": "lb"},
        {"name": "dusk", "role": "test", "domain": "dusk", "reference": "day",
         "images": "im2", "labels": "lb2"},
    ],
}


def write(tmp_path: Path, raw) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_defaults_and_relative_paths(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.output == str(tmp_path / "runs" / "x")
    assert cfg.datasets[1].images == str(tmp_path / "im2")
    assert cfg.model.path == str(tmp_path / "w.pth")
    assert [c.key for c in cfg.calibrators] == ["temperature"]
    assert cfg.evaluate.n_bins == 15
    assert cfg.source == (tmp_path / "run.yaml").resolve()
    assert [d.name for d in cfg.datasets_with_role("test")] == ["dusk"]


def test_python_model_path_and_urls_are_not_resolved(tmp_path):
    raw = {**BASE, "model": {"kind": "python", "path": "tests.helpers:factory", "num_classes": 3}}
    assert load_config(write(tmp_path, raw)).model.path == "tests.helpers:factory"
    raw = {**BASE, "model": {"kind": "espnet", "path": "https://x/y.pth", "num_classes": 3}}
    assert load_config(write(tmp_path, raw)).model.path == "https://x/y.pth"


def test_env_expansion(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCAL_TEST_ROOT", "/data/cv")
    raw = {**BASE, "datasets": [{**BASE["datasets"][0], "images": "${SEGCAL_TEST_ROOT}/val",
                                 "labels": "${NOPE_UNSET:-/fallback}/lb"}]}
    cfg = load_config(write(tmp_path, raw))
    assert cfg.datasets[0].images == "/data/cv/val"
    assert cfg.datasets[0].labels == "/fallback/lb"


def test_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE), ["fit.pixels_per_image=128", "datasets.1.limit=5", "fit.mode=ray"]
    )
    assert cfg.fit.pixels_per_image == 128
    assert cfg.fit.mode == "ray"
    assert cfg.datasets[1].limit == 5


@pytest.mark.parametrize(
    ("override", "match"),
    [
        pytest.param("fit.bogus=1", r"fit\.bogus: unknown key", id="unknown-key"),
        pytest.param("fit.pixels_per_image=abc", r"fit\.pixels_per_image", id="wrong-type"),
        pytest.param("datasets.7.limit=1", r"no list item `datasets\.7`", id="bad-index"),
        pytest.param("fit", r"key=value", id="no-equals"),
        pytest.param("datasets.0.role=train", r"datasets\.0\.role", id="bad-literal"),
        pytest.param("model.num_classes=1", r"model\.num_classes", id="too-few-classes"),
    ],
)
def test_override_errors_name_the_key(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write(tmp_path, BASE), [override])


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("output: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="Cannot read config .*missing.yaml"):
        load_config(tmp_path / "missing.yaml")
    path.write_text("- a list")
    with pytest.raises(ConfigError, match="to hold a mapping"):
        load_config(path)


@pytest.mark.parametrize(
    ("patch", "match"),
    [
        pytest.param({"datasets": [BASE["datasets"][0]] * 2}, "duplicates", id="dup-dataset"),
        pytest.param({"calibrators": [{"name": "temperature"}, {"name": "temperature"}]},
                     "duplicates", id="dup-calibrator"),
        pytest.param({"calibrators": [{"name": "temperature", "label": "uncalibrated"}]},
                     "reserved", id="reserved-label"),
        pytest.param({"model": {**BASE["model"], "class_names": ["a"]}}, "class_names",
                     id="class-names"),
        pytest.param({"datasets": [{"name": "m", "role": "test", "domain": "d",
                                    "format": "manifest"}]}, "manifest", id="manifest-missing"),
    ],
)
def test_validation(patch, match):
    with pytest.raises(ConfigError, match=match):
        parse_config({**BASE, **patch})


def test_config_hash_tracks_content():
    a = parse_config(BASE)
    b = parse_config({**BASE, "fit": {"seed": 1}})
    assert config_hash(a) == config_hash(parse_config(BASE))
    assert config_hash(a) != config_hash(b)
    assert config_hash(a, sections=["model", "datasets"]) == config_hash(
        b, sections=["model", "datasets"]
    )
