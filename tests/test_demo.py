"""``segcal demo``: finding or downloading CamVid and the weights, and the headline table.

Downloads come from a local HTTP server on 127.0.0.1 serving a tiny fake CamVid, never the
internet; the stages are replaced by a fake that writes a synthetic ``summary.csv``.
"""

from __future__ import annotations

import hashlib
import re
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline import cli, demo
from pipeline import stages as stages_mod
from pipeline.evaluate import SUMMARY_COLUMNS

SPLITS = {"train": 3, "val": 2, "test": 2}


def sha(data):
    return hashlib.sha256(data).hexdigest()


def write_fake_camvid(root):
    """A few 4x6 PNG images and labels per split; returns the hash list of the tree."""
    rng = np.random.default_rng(0)
    for split, n in SPLITS.items():
        for folder, shape in ((split, (4, 6, 3)), (f"{split}annot", (4, 6))):
            (root / folder).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 12, size=shape, dtype=np.uint8)
                Image.fromarray(pixels).save(root / folder / f"0001TP_{i:06d}.png")
    return {
        p.relative_to(root).as_posix(): sha(p.read_bytes())
        for p in sorted(root.rglob("*.png"))
    }


@pytest.fixture
def server(static_server):
    """Serve a fake CamVid; yields (base URL, requested paths, served folder, hash list)."""
    base, requests, www = static_server
    hashes = write_fake_camvid(www / "CamVid")
    (www / "espnet.pth").write_bytes(b"pretend weights")
    return base, requests, www, hashes


@pytest.fixture
def closed_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pngs_under(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.png"))


# --- CamVid ------------------------------------------------------------------------------------


def test_download_lands_checked_files_and_marker(server, tmp_path):
    base, requests, www, hashes = server
    root = demo.ensure_camvid(None, base_url=f"{base}/CamVid", cache_dir=tmp_path / "c",
                              hashes=hashes)
    assert root == tmp_path / "c" / "camvid"
    assert pngs_under(root) == sorted(hashes)
    for rel in hashes:
        assert (root / rel).read_bytes() == (www / "CamVid" / rel).read_bytes()
    assert (root / demo.COMPLETE).is_file()
    assert sorted(requests) == sorted(f"/CamVid/{rel}" for rel in hashes)
    assert not [p for p in root.rglob("*.part")]


def test_second_call_downloads_nothing(server, tmp_path):
    base, requests, _, hashes = server
    kwargs = {"base_url": f"{base}/CamVid", "cache_dir": tmp_path / "c", "hashes": hashes}
    first = demo.ensure_camvid(None, **kwargs)
    n = len(requests)
    assert demo.ensure_camvid(None, **kwargs) == first
    assert len(requests) == n


def test_interrupted_download_resumes(server, tmp_path):
    base, requests, _, hashes = server
    kwargs = {"base_url": f"{base}/CamVid", "cache_dir": tmp_path / "c", "hashes": hashes}
    root = demo.ensure_camvid(None, **kwargs)
    (root / demo.COMPLETE).unlink()  # as if killed before the marker
    (root / "val/0001TP_000001.png").unlink()
    requests.clear()
    demo.ensure_camvid(None, **kwargs)
    assert requests == ["/CamVid/val/0001TP_000001.png"]
    assert (root / demo.COMPLETE).is_file()


def test_base_url_from_environment(server, tmp_path, monkeypatch):
    base, requests, _, hashes = server
    monkeypatch.setenv("SEGCAL_CAMVID_URL", f"{base}/CamVid/")
    demo.ensure_camvid(None, cache_dir=tmp_path / "c", hashes=hashes)
    assert len(requests) == len(hashes)


def test_wrong_hash_on_server_is_rejected(server, tmp_path):
    base, _, www, hashes = server
    (www / "CamVid" / "train/0001TP_000001.png").write_bytes(b"tampered")
    root = tmp_path / "c" / "camvid"
    with pytest.raises(demo.DemoDataError, match=r"CamVid file train/0001TP_000001\.png .*sha256"):
        demo.ensure_camvid(None, base_url=f"{base}/CamVid", cache_dir=tmp_path / "c",
                           hashes=hashes)
    assert not (root / "train/0001TP_000001.png").exists()
    assert not (root / demo.COMPLETE).exists()
    for p in root.rglob("*.png"):  # whatever did land is intact
        assert sha(p.read_bytes()) == hashes[p.relative_to(root).as_posix()]


def test_no_network_says_what_to_set(closed_port, tmp_path):
    with pytest.raises(demo.DemoDataError) as exc:
        demo.ensure_camvid(None, base_url=f"http://127.0.0.1:{closed_port}/CamVid",
                           cache_dir=tmp_path / "c", hashes={"val/a.png": "0" * 64})
    message = str(exc.value)
    assert message.startswith(f"Could not download CamVid from http://127.0.0.1:{closed_port}/")
    assert "set CAMVID_ROOT=/path/to/CamVid" in message
    assert "--data /path/to/CamVid" in message
    assert not (tmp_path / "c" / "camvid" / demo.COMPLETE).exists()


def test_http_error_names_the_status(server, tmp_path):
    base, _, _, _ = server
    with pytest.raises(demo.DemoDataError, match="HTTP 404"):
        demo.ensure_camvid(None, base_url=f"{base}/CamVid", cache_dir=tmp_path / "c",
                           hashes={"val/missing.png": "0" * 64})


def test_local_root_is_checked_not_downloaded(tmp_path):
    write_fake_camvid(tmp_path / "cv")
    assert demo.ensure_camvid(str(tmp_path / "cv")) == tmp_path / "cv"
    for p in (tmp_path / "cv" / "valannot").iterdir():
        p.unlink()
    (tmp_path / "cv" / "valannot").rmdir()
    with pytest.raises(demo.DemoDataError, match=r"to hold valannot/, but it is missing"):
        demo.ensure_camvid(str(tmp_path / "cv"))
    with pytest.raises(demo.DemoDataError, match="to exist, but it does not"):
        demo.ensure_camvid(str(tmp_path / "nowhere"))


# --- the committed hash list -------------------------------------------------------------------


def test_committed_hash_list_is_well_formed():
    hashes = demo.read_hashes()  # rejects malformed lines and repeated paths
    assert len(hashes) == 2 * (367 + 101 + 233) == 1402
    for split, n in (("train", 367), ("val", 101), ("test", 233)):
        images = sorted(Path(r).name for r in hashes if r.startswith(f"{split}/"))
        labels = sorted(Path(r).name for r in hashes if r.startswith(f"{split}annot/"))
        assert len(images) == n
        assert images == labels
    assert list(hashes) == sorted(hashes, key=lambda r: Path(r).parts)


@pytest.mark.data
def test_committed_hash_list_matches_local_copy(camvid_root):
    assert demo.hash_tree(camvid_root) == demo.read_hashes()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param(f"{'a' * 64} train/x.png\n", "line 1", id="one-space"),
        pytest.param(f"{'a' * 64}  other/x.png\n", "line 1", id="unknown-folder"),
        pytest.param(f"{'a' * 64}  ../x.png\n", "line 1", id="escape"),
        pytest.param(f"{'a' * 64}  val/x.png\n{'b' * 64}  val/x.png\n", "repeats on line 2",
                     id="repeat"),
    ],
)
def test_malformed_hash_list(tmp_path, text, message):
    (tmp_path / "h").write_text(text)
    with pytest.raises(ValueError, match=message):
        demo.read_hashes(tmp_path / "h")


# --- weights -----------------------------------------------------------------------------------


def test_weights_path_with_wrong_sha_is_named(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"not espnet")
    with pytest.raises(demo.DemoDataError, match=re.escape(f"{path} (from --weights or SEGCAL")):
        demo.ensure_espnet_weights(str(path))
    with pytest.raises(demo.DemoDataError, match="does not exist"):
        demo.ensure_espnet_weights(str(tmp_path / "missing.pth"))


def test_weights_download(server, tmp_path, monkeypatch):
    base, requests, _, _ = server
    monkeypatch.setattr(demo, "ESPNET_SHA256", sha(b"pretend weights"))
    monkeypatch.setenv("SEGCAL_ESPNET_URL", f"{base}/espnet.pth")
    path = demo.ensure_espnet_weights(None, cache_dir=tmp_path / "c")
    assert path.read_bytes() == b"pretend weights"
    assert demo.ensure_espnet_weights(str(path)) == path
    assert requests == ["/espnet.pth"]


def test_weights_no_network_says_what_to_set(closed_port, tmp_path):
    with pytest.raises(demo.DemoDataError) as exc:
        demo.ensure_espnet_weights(None, url=f"http://127.0.0.1:{closed_port}/w.pth",
                                   cache_dir=tmp_path / "c")
    assert "set SEGCAL_ESPNET_WEIGHTS=" in str(exc.value)
    assert "--weights " in str(exc.value)


def test_weights_checksum_mismatch_on_download(server, tmp_path):
    base, _, _, _ = server
    with pytest.raises(demo.DemoDataError, match=f"but got {sha(b'pretend weights')}"):
        demo.ensure_espnet_weights(None, url=f"{base}/espnet.pth", cache_dir=tmp_path / "c")
    assert not [p for p in (tmp_path / "c").rglob("*") if p.is_file()]


# --- headline table ----------------------------------------------------------------------------


def write_summary(folder, ece, nll=None):
    """A summary.csv with the real columns; ``ece``: {calibrator: {dataset: value}}."""
    rows = []
    for calibrator, per_dataset in ece.items():
        for dataset, value in per_dataset.items():
            row = dict.fromkeys(SUMMARY_COLUMNS, 0.5)
            row.update(dataset=dataset, domain=dataset, reference=None, role="test",
                       calibrator=calibrator, img_ece=value, miou=0.6,
                       nll=(nll or {}).get(calibrator, {}).get(dataset, 0.4))
            rows.append(row)
    heldout = dict(rows[0], dataset="camvid-val-heldout", role="calibration", img_ece=0.0)
    pd.DataFrame([*rows, heldout], columns=list(SUMMARY_COLUMNS)).to_csv(
        folder / "summary.csv", index=False
    )


def cells(text):
    """{(row label, column header): cell} of the first block of the table."""
    lines = text.splitlines()[1:]
    header = lines[0].split()
    return {
        (line.split()[0], col): cell
        for line in lines[1 : lines.index("")]
        for col, cell in zip(header, line.split()[1:], strict=True)
    }


def test_headline_table_marks_best(tmp_path):
    ece = {
        "uncalibrated": {"day": 0.055, "dusk": 0.064, "fog-3": 0.420},
        "temperature": {"day": 0.032, "dusk": 0.038, "fog-3": 0.387},
        "selective": {"day": 0.149, "dusk": 0.0381, "fog-3": 0.300},
    }
    write_summary(tmp_path, ece, nll={"temperature": {"day": 0.3}})
    text = demo.headline_table(tmp_path)
    table = cells(text)
    assert table[("uncalibrated", "day")] == "0.055"
    assert table[("temperature", "day")] == "0.032*"
    assert table[("temperature", "dusk")] == "0.038*"
    assert table[("selective", "dusk")] == "0.038*"  # equal as printed: both marked
    assert table[("selective", "fog-3")] == "0.300*"
    assert table[("temperature", "fog-3")] == "0.387"
    assert "camvid-val-heldout" not in text  # test sets only
    assert "NLL day" in text
    assert "mIoU dusk" in text
    assert re.search(r"temperature\s+0\.300\*\s+0\.400\*?\s+0\.600", text)
    assert max(len(line) for line in text.splitlines()) <= 100


def test_headline_table_never_marks_the_oracle_bound(tmp_path):
    ece = {
        "uncalibrated": {"day": 0.055, "fog-3": 0.420},
        "oracle_ts": {"day": 0.030, "fog-3": 0.120},  # lower everywhere: fitted on the labels
        "temperature": {"day": 0.032, "fog-3": 0.387},
    }
    write_summary(tmp_path, ece, nll={"oracle_ts": {"day": 0.2}, "temperature": {"day": 0.3}})
    text = demo.headline_table(tmp_path)
    table = cells(text)
    assert table[("oracle_ts", "day")] == "0.030"
    assert table[("temperature", "day")] == "0.032*"
    assert table[("temperature", "fog-3")] == "0.387*"
    assert "oracle_ts is a bound" in text
    assert re.search(r"oracle_ts\s+0\.200\s", text)  # NLL: shown, not marked
    assert max(len(line) for line in text.splitlines()) <= 100


def test_headline_table_wraps_many_sets(tmp_path):
    datasets = [f"noise-{i}" for i in range(1, 21)]
    write_summary(tmp_path, {c: dict.fromkeys(datasets, 0.1) for c in ("uncalibrated", "ts")})
    text = demo.headline_table(tmp_path)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "NLL noise-1" in text  # no day/dusk: the first two test sets


def test_headline_table_needs_summary(tmp_path):
    with pytest.raises(FileNotFoundError, match="segcal evaluate"):
        demo.headline_table(tmp_path)


# --- segcal demo -------------------------------------------------------------------------------


@pytest.fixture
def fake_stages(monkeypatch):
    calls = []

    def call_stage(cfg, stage):
        calls.append((stage, cfg))
        out = Path(cfg.output)
        if stage == "evaluate":
            out.mkdir(parents=True, exist_ok=True)
            write_summary(out, {"uncalibrated": {"day": 0.05}, "temperature": {"day": 0.03}})
        elif stage == "report":
            (out / "report.html").write_text("<html></html>")

    monkeypatch.setattr(stages_mod, "call_stage", call_stage)
    monkeypatch.setattr("pipeline.cli_commands._init_ray", lambda: None)
    # cmd_demo sets both; setenv first so that they are restored after the test.
    monkeypatch.setenv("CAMVID_ROOT", "")
    monkeypatch.setenv("SEGCAL_ESPNET_WEIGHTS", "")
    return calls


def test_demo_configs_are_found():
    assert demo.config_path() == demo.CONFIGS / "camvid_espnet.yaml"
    assert demo.config_path(quick=True).is_file()


def test_demo_command_runs_quick_config_and_prints_table(tmp_path, monkeypatch, fake_stages,
                                                         capsys):
    write_fake_camvid(tmp_path / "cv")
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"w")
    # The real quick config, but checking the fake weights' digest (the stages check it too).
    text = (demo.CONFIGS / demo.QUICK_CONFIG).read_text()
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / demo.QUICK_CONFIG).write_text(text.replace(demo.ESPNET_SHA256, sha(b"w")))
    monkeypatch.setattr(demo, "CONFIGS", configs)
    monkeypatch.setattr(demo, "ESPNET_SHA256", sha(b"w"))
    out = tmp_path / "run"
    code = cli.main(["demo", "--quick", "--data", str(tmp_path / "cv"), "--weights", str(weights),
                     "--output", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == cli.OK, stderr
    assert [stage for stage, _ in fake_stages] == ["extract", "fit", "evaluate", "report"]
    cfg = fake_stages[0][1]
    assert cfg.source == configs / demo.QUICK_CONFIG
    assert cfg.model.sha256 == sha(b"w")
    assert cfg.model.path == str(weights)
    assert all(d.images.startswith(str(tmp_path / "cv")) for d in cfg.datasets)
    assert "temperature" in stdout
    assert "0.030*" in stdout
    assert stdout.rstrip().splitlines()[-1].startswith(f"report: {out / 'report.html'}")


def test_demo_command_without_network_exits_2(tmp_path, monkeypatch, fake_stages, closed_port,
                                              capsys):
    monkeypatch.setenv("SEGCAL_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SEGCAL_CAMVID_URL", f"http://127.0.0.1:{closed_port}/CamVid")
    code = cli.main(["demo", "--quick", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == cli.USAGE
    assert "Could not download CamVid" in err
    assert "CAMVID_ROOT=" in err
    assert fake_stages == []


def test_demo_command_bad_data_folder_exits_2(tmp_path, fake_stages, capsys):
    (tmp_path / "cv" / "train").mkdir(parents=True)
    code = cli.main(["demo", "--data", str(tmp_path / "cv")])
    assert code == cli.USAGE
    assert "to hold val/" in capsys.readouterr().err
