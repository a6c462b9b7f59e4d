"""cluster.yaml: valid for Ray's own launcher schema (offline), and shaped as the design asks."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def raw() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


@pytest.fixture(scope="module")
def prepared(raw) -> dict:
    # What `ray up` does before launching anything: fill the provider defaults, then validate
    # against ray/autoscaler/ray-schema.json plus the launcher's own cross-field checks.
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(raw))
    validate_config(config)
    return config


def test_validates_against_ray_schema(prepared, raw):
    assert prepared["provider"]["type"] == raw["provider"]["type"] == "aws"


def test_schema_check_is_real(raw):
    # The same validation rejects a misspelt field, so the test above can fail.
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = copy.deepcopy(raw)
    bad["available_node_types"]["gpu_worker"]["min_worker"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_worker"):
        validate_config(prepare_config(bad))


def test_head_does_no_work(prepared):
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"]["CPU"] == 0
    assert "GPU" not in head["resources"]


def test_gpu_workers_autoscale_from_zero(prepared):
    workers = [
        spec
        for name, spec in prepared["available_node_types"].items()
        if name != prepared["head_node_type"]
    ]
    gpu = [w for w in workers if w["resources"].get("GPU", 0) >= 1]
    assert gpu, "expected a GPU worker type"
    assert all(w["min_workers"] == 0 and w["max_workers"] >= 1 for w in gpu)
    assert prepared["max_workers"] >= max(w["max_workers"] for w in gpu)


def test_dashboard_bound_to_localhost(prepared):
    head_start = " ".join(prepared["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "0.0.0.0" not in head_start


def test_token_auth_on_every_node(prepared):
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        assert "RAY_AUTH_MODE=token" in " ".join(prepared[key]), key
    assert "~/.ray/auth_token" in prepared["file_mounts"]


def test_installs_the_pinned_release(prepared):
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    setup = " ".join(prepared["setup_commands"])
    assert f"segcal-{version}-py3-none-any.whl" in setup
    images = [prepared["docker"]["image"], prepared["docker"]["head_image"]]
    ray_version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = next(d for d in ray_version if d.startswith("ray"))
    assert all(f":{pinned.split('==')[1]}-" in image for image in images)


def test_every_field_is_commented():
    lines = CLUSTER.read_text().splitlines()
    key = re.compile(r"^\s*(- )?[~\w./-]+:(\s|$)")
    uncommented = []
    for i, line in enumerate(lines):
        if not key.match(line) or "#" in line:
            continue
        previous = next((p for p in reversed(lines[:i]) if p.strip()), "")
        if not previous.strip().startswith("#"):
            uncommented.append(f"{i + 1}: {line.strip()}")
    assert not uncommented, "fields without a comment above them:\n" + "\n".join(uncommented)
