import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    ConfigError,
    config_hash,
    load_config,
    parse_config,
    write_resolved_config,
)

ROOT = Path(__file__).resolve().parents[1]

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


# --------------------------------------------------------------------------------------------
# Safety: names that become paths, environment variables, outputs apart from inputs (issue 19)


def _with_dataset(**patch):
    return {**BASE, "datasets": [{**BASE["datasets"][0], **patch}]}


@pytest.mark.parametrize("name", [".", "..", "...", ".hidden", "a/b", "../x", "-x", "", "a\0b"])
def test_dataset_names_that_are_not_plain_folder_names_are_refused(name):
    with pytest.raises(ConfigError, match=r"datasets\.0\.name"):
        parse_config(_with_dataset(name=name))


@pytest.mark.parametrize("label", [".", "..", ".x", "a/b", "/abs"])
def test_calibrator_labels_that_are_not_plain_folder_names_are_refused(label):
    # Issue 19 item 1: label "." made fit replace artifacts/ itself, deleting the others.
    raw = {**BASE, "calibrators": [{"name": "vector", "label": "vs"},
                                   {"name": "temperature", "label": label}]}
    with pytest.raises(ConfigError, match=r"calibrators\.1\.label"):
        parse_config(raw)


def test_calibrator_names_are_plain_folder_names_too():
    # Without a label the name is the artifact folder.
    with pytest.raises(ConfigError, match=r"calibrators\.0\.name"):
        parse_config({**BASE, "calibrators": [{"name": ".."}]})


def test_names_with_dots_and_dashes_inside_are_accepted():
    cfg = parse_config({**_with_dataset(name="camvid-val.v2_1"),
                        "calibrators": [{"name": "temperature", "label": "ts.v1-a"}]})
    assert cfg.datasets[0].name == "camvid-val.v2_1"
    assert cfg.calibrators[0].key == "ts.v1-a"


def test_unset_variable_without_default_is_an_error_naming_it_and_the_key(tmp_path, monkeypatch):
    # Issue 19 item 2: this wrote to /segcal_out at the filesystem root.
    monkeypatch.delenv("SEGCAL_NOPE_OUT", raising=False)
    with pytest.raises(ConfigError, match=r"output: environment variable \$\{SEGCAL_NOPE_OUT\} "
                       r"is not set"):
        load_config(write(tmp_path, BASE), ["output=${SEGCAL_NOPE_OUT}/segcal_out"])
    raw = _with_dataset(images="${SEGCAL_NOPE_OUT}/im")
    with pytest.raises(ConfigError, match=r"datasets\.0\.images: .*SEGCAL_NOPE_OUT"):
        load_config(write(tmp_path, raw))


def test_empty_variable_without_default_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCAL_EMPTY", "")
    with pytest.raises(ConfigError, match=r"output: .*\$\{SEGCAL_EMPTY\} is empty"):
        load_config(write(tmp_path, {**BASE, "output": "${SEGCAL_EMPTY}"}))
    monkeypatch.setenv("SEGCAL_EMPTY", "")
    cfg = load_config(write(tmp_path, {**BASE, "output": "runs/a${SEGCAL_EMPTY:-}"}))
    assert cfg.output == str(tmp_path / "runs" / "a")


def test_empty_output_is_an_error(tmp_path):
    # "" would resolve to the config's own folder.
    with pytest.raises(ConfigError, match=r"output: Expected a path, but got an empty string"):
        load_config(write(tmp_path, {**BASE, "output": ""}))


@pytest.mark.parametrize(
    ("output", "images", "inside"),
    [
        pytest.param("data/im/out", "data/im", "`output`", id="output-in-images"),
        pytest.param("data/im", "data/im", "`output`", id="output-is-images"),
        pytest.param("runs", "runs/im", "the input folder `datasets.0.images`",
                     id="images-in-output"),
    ],
)
def test_output_and_input_folders_must_be_apart(tmp_path, output, images, inside):
    # Issue 19 item 4: the run wrote into the images folder and read its plots back as images.
    raw = {**_with_dataset(images=images), "output": output}
    with pytest.raises(ConfigError, match=f"Expected {inside}") as err:
        load_config(write(tmp_path, raw))
    message = str(err.value)
    assert str(tmp_path / output) in message
    assert str(tmp_path / images) in message


def test_output_beside_inputs_is_accepted(tmp_path):
    raw = {**_with_dataset(images="data/im", labels="data/lb"), "output": "data/im-runs"}
    assert load_config(write(tmp_path, raw)).output == str(tmp_path / "data" / "im-runs")


# --------------------------------------------------------------------------------------------
# Strict numbers and booleans, bounds, calibrator options at parse time


@pytest.mark.parametrize(
    ("override", "key"),
    [
        pytest.param("model.num_classes=true", r"model\.num_classes", id="bool-for-int"),
        pytest.param("model.num_classes=3.0", r"model\.num_classes", id="float-for-int"),
        pytest.param("fit.heldout_fraction='0.5'", r"fit\.heldout_fraction", id="str-for-float"),
        pytest.param("fit.heldout_fraction=true", r"fit\.heldout_fraction", id="bool-for-float"),
        pytest.param("fit.use_gpu=1", r"fit\.use_gpu", id="int-for-bool"),
        pytest.param("fit.use_gpu=yes_please", r"fit\.use_gpu", id="str-for-bool"),
        pytest.param("evaluate.n_bins=1e9", r"evaluate\.n_bins", id="yaml-1e9-is-a-string"),
        pytest.param("evaluate.n_bins=1001", r"evaluate\.n_bins: .*less than or equal to 1000",
                     id="too-many-bins"),
        pytest.param("evaluate.n_bins=0", r"evaluate\.n_bins", id="no-bins"),
        pytest.param("evaluate.bootstrap=1000000000", r"evaluate\.bootstrap", id="bootstrap"),
        pytest.param("datasets.0.ignore_index=-1", r"datasets\.0\.ignore_index: .*greater than",
                     id="negative-ignore-index"),
        pytest.param("datasets.0.ignore_index=65536", r"datasets\.0\.ignore_index: .*65535",
                     id="ignore-index-over-uint16"),
        pytest.param("extract.store_stride=true", r"extract\.store_stride", id="bool-stride"),
        pytest.param("extract.store_stride=2.0", r"extract\.store_stride", id="float-stride"),
        pytest.param("model.mean=[0, '0.5', 0]", r"model\.mean\.1", id="str-in-tuple"),
        pytest.param("model.scale=.nan", r"model\.scale: .*finite", id="nan"),
        pytest.param("refresh.tolerance=.inf", r"refresh\.tolerance: .*finite", id="inf"),
    ],
)
def test_numbers_and_booleans_are_strict_and_bounded(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key):
        load_config(write(tmp_path, BASE), [override])


def test_ints_are_accepted_for_floats(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["model.scale=1", "model.std=[1, 2, 3]",
                                              "fit.heldout_fraction=0", "evaluate.n_bins=1000",
                                              "datasets.0.ignore_index=0"])
    assert cfg.model.scale == 1.0
    assert isinstance(cfg.model.scale, float)
    assert cfg.model.std == (1.0, 2.0, 3.0)
    assert cfg.evaluate.n_bins == 1000


def test_label_map_from_yaml_keeps_int_keys(tmp_path):
    raw = _with_dataset(label_map={0: 255, 7: 1})
    assert load_config(write(tmp_path, raw)).datasets[0].label_map == {0: 255, 7: 1}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        pytest.param({"name": "nope"}, r"calibrators\.1\.name: Unknown calibrator 'nope'",
                     id="unknown-name"),
        pytest.param({"name": "temperature", "options": {"bogus": 1}},
                     r"calibrators\.1\.options: Unknown option\(s\) \['bogus'\]",
                     id="unknown-option"),
        pytest.param({"name": "temperature", "options": {"t_min": "x"}},
                     r"calibrators\.1\.options: Expected `t_min` to be a float", id="bad-type"),
        pytest.param({"name": "selective", "options": {"gate": "medium"}},
                     r"calibrators\.1\.options: Expected `gate` to be one of", id="bad-value"),
        pytest.param({"name": "temperature", "options": {"use_corrupted": "yes"}},
                     r"calibrators\.1\.options\.use_corrupted: Expected a bool", id="fit-option"),
    ],
)
def test_calibrator_options_are_checked_at_parse_time(spec, match):
    # Issue 19: these were found only by `segcal fit`, after a full extraction.
    raw = {**BASE, "calibrators": [{"name": "temperature", "label": "ts"}, spec]}
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_fit_stage_options_are_accepted():
    raw = {**BASE, "calibrators": [{"name": "vector", "options": {
        "use_corrupted": True, "augment_corruptions": [{"kind": "fog", "severity": 3}]}}]}
    assert parse_config(raw).calibrators[0].options["use_corrupted"] is True


def test_every_registered_calibrator_passes_the_parse_time_check():
    from pipeline.calibrators import list_calibrators

    cfg = parse_config({**BASE, "calibrators": list_calibrators()})
    assert [c.name for c in cfg.calibrators] == list_calibrators()


def test_calibrator_check_allocates_nothing():
    # matrix holds a C x C weight: 60000 classes would be 14 GB if really built (it is built
    # on the meta device above 1024 classes).
    raw = {**BASE, "model": {**BASE["model"], "num_classes": 60_000},
           "calibrators": [{"name": "matrix"}, {"name": "vector"}, {"name": "temperature"}]}
    start = time.perf_counter()
    parse_config(raw)
    assert time.perf_counter() - start < 30.0


def test_calibrators_may_be_plain_names(tmp_path):
    # Issue 18 item 6: plain names were refused with "Input should be a valid dictionary".
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE) + "calibrators:\n  - temperature\n  - selective\n"
                    "  - {name: selective, label: soft, options: {gate: soft}}\n")
    cfg = load_config(path)
    assert [(c.name, c.key, c.options) for c in cfg.calibrators] == [
        ("temperature", "temperature", {}),
        ("selective", "selective", {}),
        ("selective", "soft", {"gate": "soft"}),
    ]
    with pytest.raises(ConfigError, match=r"calibrators\.0\.name: Unknown calibrator 'tempreture'"):
        parse_config({**BASE, "calibrators": ["tempreture"]})


# --------------------------------------------------------------------------------------------
# YAML alias bombs and deep nesting (issue 19 item 12)


def _alias_bomb(levels: int) -> str:
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        refs = ", ".join([f"*a{i - 1}"] * 9)
        lines.append(f"a{i}: &a{i} [{refs}]")
    return "\n".join(lines) + f"\noutput: *a{levels}\n"


def test_alias_bomb_fails_fast(tmp_path):
    text = _alias_bomb(9)  # 9^10 strings once expanded
    assert len(text) < 1100
    path = tmp_path / "bomb.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="alias") as err:
        load_config(path)
    assert time.perf_counter() - start < 0.5
    assert len(str(err.value)) < 500


def test_recursive_alias_and_deep_nesting_fail_cleanly(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("output: &x [1, *x]\n")
    with pytest.raises(ConfigError, match="bomb|recursive|deep"):
        load_config(path)
    path.write_text("output: " + "[" * 100 + "]" * 100 + "\n")
    with pytest.raises(ConfigError, match="nested at most 64 deep"):
        load_config(path)
    path.write_text("output: " + "[" * 1000 + "]" * 1000 + "\n")
    with pytest.raises(ConfigError, match="nested too deeply|not valid YAML"):
        load_config(path)


def test_values_json_cannot_hold_are_a_config_error(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(BASE) + "extra_date: 2020-01-01\n")
    with pytest.raises(ConfigError, match="not JSON serializable"):
        load_config(path)


def test_a_few_aliases_still_work(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in BASE.items() if k != "calibrators"})
                    + "calibrators:\n  - {name: selective, label: a, options: &o {gate: soft}}\n"
                    "  - {name: selective, label: b, options: *o}\n")
    cfg = load_config(path)
    assert cfg.calibrators[1].options == {"gate": "soft"}


# --------------------------------------------------------------------------------------------
# config.resolved.yaml


def test_write_resolved_config_round_trips(tmp_path, monkeypatch):
    monkeypatch.setenv("SEGCAL_TEST_ROOT", str(tmp_path / "data"))
    raw = _with_dataset(images="${SEGCAL_TEST_ROOT}/im")
    cfg = load_config(write(tmp_path, raw), ["calibrators=[temperature]"])
    path = write_resolved_config(cfg)
    assert path == Path(cfg.output) / "config.resolved.yaml"
    text = path.read_text()
    assert f"config_hash {config_hash(cfg)}" in text.splitlines()[0]
    assert "${" not in text
    again = load_config(path)
    assert again.model_dump() == cfg.model_dump()
    assert config_hash(again) == config_hash(cfg)


def test_presets_expand_to_their_calibrator_and_options():
    from pipeline.config import CalibratorSpec
    from pipeline.presets import PRESETS, list_presets

    assert "selective_plus" in list_presets()
    plain = CalibratorSpec.model_validate("selective_plus")
    base, options, _ = PRESETS["selective_plus"]
    assert (plain.name, plain.key, plain.options) == (base, "selective_plus", options)
    custom = CalibratorSpec.model_validate(
        {"name": "selective_plus", "label": "sp2", "options": {"batch_size": 4096}})
    assert custom.key == "sp2"
    assert custom.options == {**options, "batch_size": 4096}


def test_the_demo_configs_name_presets_with_unchanged_calibrators():
    from pipeline.config import load_config

    cfg = load_config(ROOT / "configs" / "camvid_espnet.yaml")
    specs = {s.key: s for s in cfg.calibrators}
    assert specs["selective_plus"].name == "selective"
    assert specs["selective_plus"].options["gate"] == "soft"
    assert specs["selective_published"].options == {
        "t_mis": 1e10, "t_cor": 1.0, "gate": "hard", "features": "logprobs"}


def test_monitor_sets_go_without_labels_but_other_roles_need_them():
    monitor = {"name": "night", "role": "monitor", "domain": "night", "images": "im3"}
    cfg = parse_config({**BASE, "datasets": [*BASE["datasets"], monitor]})
    assert cfg.datasets_with_role("monitor")[0].labels is None
    for role in ("calibration", "test"):
        unlabelled = {**monitor, "role": role}
        with pytest.raises(ConfigError) as err:
            parse_config({**BASE, "datasets": [*BASE["datasets"][:1], unlabelled]}, source="c.yaml")
        text = str(err.value)
        assert "datasets.1" in text
        assert f"Expected `labels` to be set for format 'folder' and role '{role}'" in text
    with pytest.raises(ConfigError, match=r"datasets\.0.*Expected `images` to be set"):
        parse_config({**BASE, "datasets": [{**monitor, "images": None}]})
