"""Tiny `python`-kind model factories for the extraction tests (importable by Ray workers).

Ray workers start in the driver's working directory (the repository root under pytest), so
``model.path: "tests.extract_helpers:tiny_net"`` resolves there as it does in the driver.
"""

from __future__ import annotations

import torch
from torch import nn

NUM_CLASSES = 4


def tiny_net(num_classes: int = NUM_CLASSES) -> nn.Module:
    """Seeded conv net with logits at half the input resolution (exercises upsampling)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(3, num_classes, 3, padding=1))


class _NanOnBright(nn.Module):
    """tiny_net, except images brighter than 0.9 on average get NaN logits."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = tiny_net(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        bright = x.mean(dim=(1, 2, 3)) > 0.9
        out[bright] = float("nan")
        return out


def nan_on_bright(num_classes: int = NUM_CLASSES) -> nn.Module:
    """A model whose output is unusable (NaN) for bright images only."""
    return _NanOnBright(num_classes)


def too_few_classes() -> nn.Module:
    """A model with one channel fewer than the tests' class count."""
    return tiny_net(NUM_CLASSES - 1)


class _RaiseOnBright(nn.Module):
    """tiny_net, except that it raises (not a ValueError) on a batch with a bright image."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.net = tiny_net(num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x.mean(dim=(1, 2, 3)) > 0.9).any()):
            raise RuntimeError("cannot segment a bright image")
        return self.net(x)


def raise_on_bright(num_classes: int = NUM_CLASSES) -> nn.Module:
    """A model that fails with a RuntimeError on bright images only."""
    return _RaiseOnBright(num_classes)


class _NodeRecording(nn.Module):
    """tiny_net; its constructor notes whether it runs on a node offering `extract_node`."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        import os

        import ray

        self.net = tiny_net(num_classes)
        log = os.environ.get("SEGCAL_TEST_NODE_LOG")
        if log and ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
            (resources,) = [n["Resources"] for n in ray.nodes() if n["NodeID"] == node]
            with open(os.path.join(log, f"{os.getpid()}.txt"), "w") as f:
                f.write(f"{node} {'extract_node' in resources}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def node_recording_net(num_classes: int = NUM_CLASSES) -> nn.Module:
    """tiny_net that records the node it was built on (see `_NodeRecording`)."""
    return _NodeRecording(num_classes)


def write_pairs(folder, count: int, size: tuple[int, int], seed: int = 0) -> None:
    """``count`` seeded random image/label PNG pairs ``f00.png``... in ``folder/img``, ``/lab``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for sub in ("img", "lab"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            folder / "img" / f"f{i:02d}.png")
        Image.fromarray(rng.integers(0, NUM_CLASSES, size, dtype=np.uint8)).save(
            folder / "lab" / f"f{i:02d}.png")


PID_LOG = "/tmp/segcal-test-actor-pids"


class _PidRecording(nn.Module):
    """tiny_net that notes its process id in PID_LOG, then runs slowly enough to be killed."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        import os

        self.net = tiny_net(num_classes)
        if os.path.isdir(PID_LOG):
            with open(os.path.join(PID_LOG, str(os.getpid())), "w") as f:
                f.write(str(os.getpid()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(0.05)
        return self.net(x)


def pid_recording_net(num_classes: int = NUM_CLASSES) -> nn.Module:
    """tiny_net whose builders leave their pid in PID_LOG (see `_PidRecording`)."""
    return _PidRecording(num_classes)
