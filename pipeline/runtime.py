"""Start or join the Ray runtime that segcal's stages run on, keeping a local one on loopback.

Every stage that needs Ray calls :func:`init_ray`, which

- does nothing when Ray is already initialised (a test fixture, a notebook, an earlier stage);
- connects to ``RAY_ADDRESS`` when it is set (inside a Ray job it always is; set
  ``RAY_ADDRESS=auto`` to join a cluster started on this machine with ``ray start``);
- otherwise starts a local Ray whose processes listen on 127.0.0.1 only.

Why the last point needs work: on Linux, Ray gives a local runtime the machine's network address,
and its GCS, raylet, workers and agents then listen on every interface (``0.0.0.0`` / ``::``),
where anyone on the network can reach them. Ray keeps a runtime on loopback only when
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` (its single-machine mode, the default on macOS and
Windows): the node's address is then 127.0.0.1 and every process binds to it.
:func:`init_ray` sets that variable (Ray's own processes inherit it) before starting Ray, and the
dashboard, when Ray starts one, is bound to 127.0.0.1 as well (``ray dashboard`` or an SSH
tunnel reaches it). ``ray.init(_node_ip_address="127.0.0.1")`` alone does not do it: Ray
replaces a loopback node address with the network one.

Set ``SEGCAL_RAY_BIND=all`` to get Ray's own behaviour back (a local runtime reachable from
other machines, e.g. to attach workers by hand).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

BIND_ENV = "SEGCAL_RAY_BIND"
BIND_CHOICES = ("loopback", "all")
LOOPBACK = "127.0.0.1"
# Ray's switch for its single-machine mode (ray/_private/ray_constants.py, ENABLE_RAY_CLUSTER).
RAY_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def bind_mode(environ: Mapping[str, str] | None = None) -> str:
    """Where a local Ray started by segcal listens: ``SEGCAL_RAY_BIND``, ``loopback`` by default.

    Raises:
        ValueError: ``SEGCAL_RAY_BIND`` is set to something other than ``loopback`` or ``all``.

    Example:
        >>> bind_mode({})
        'loopback'
        >>> bind_mode({"SEGCAL_RAY_BIND": "all"})
        'all'
    """
    environ = os.environ if environ is None else environ
    mode = environ.get(BIND_ENV, "").strip().lower() or "loopback"
    if mode not in BIND_CHOICES:
        raise ValueError(
            f"Expected `{BIND_ENV}` to be one of {list(BIND_CHOICES)}, but got "
            f"{environ.get(BIND_ENV)!r}"
        )
    return mode


def _keep_on_loopback() -> None:
    """Put Ray in its single-machine mode, for this process and the Ray processes it starts."""
    os.environ[RAY_SINGLE_MACHINE_ENV] = "0"
    # Ray reads the variable once, when ray_constants is first imported; it may be already.
    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


def init_ray() -> None:
    """Join the Ray runtime at ``RAY_ADDRESS``, or start a local one on loopback.

    Does nothing when Ray is already initialised. ``RAY_ADDRESS=local`` (or empty) counts as
    unset. A local runtime listens on 127.0.0.1 only unless ``SEGCAL_RAY_BIND=all``; see the
    module docstring.

    Raises:
        ValueError: a bad ``SEGCAL_RAY_BIND``.
        ConnectionError: nothing answers at ``RAY_ADDRESS`` (raised by ``ray.init``).
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and address != "local":
        ray.init()  # reads RAY_ADDRESS
        return
    if bind_mode() == "all":
        logger.warning("%s=all: the local Ray runtime listens on every network interface", BIND_ENV)
        ray.init(address="local")
        return
    _keep_on_loopback()
    ray.init(address="local", dashboard_host=LOOPBACK)
