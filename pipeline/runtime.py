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

A driver killed with SIGKILL cannot shut Ray down. Ray's GCS, raylet and dashboard die with it
(the kernel's parent-death signal), but the raylet's DashboardAgent and RuntimeEnvAgent notice
the dead raylet and then spend 60 s trying to report it to the dead GCS (a fixed timeout in
``ray._private.utils.publish_error_to_driver``) before they exit, still listening. So a local
runtime started here gets a small watcher process (stdlib only, :data:`_WATCHER`) that notes
the raylet's children; when this driver's end of a pipe closes (or the raylet dies), it waits
:data:`WATCH_GRACE_S` for Ray's own cleanup, then ends those still running: the agents and any
worker left.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Mapping

logger = logging.getLogger(__name__)

BIND_ENV = "SEGCAL_RAY_BIND"
WATCH_GRACE_S = 3.0
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


# Run as `python -S -c _WATCHER RAYLET_PID GRACE_S` with the driver holding the other end of
# its stdin. It notes the raylet's children (agents, workers) every second, and when the driver
# is gone (EOF: exited or killed) or the raylet is, ends those still running after GRACE_S.
# Processes are told apart by their start time, so a reused pid is never signalled.
_WATCHER = """
import os, select, signal, sys, time
raylet, grace = sys.argv[1], float(sys.argv[2])

def stat(pid):
    try:
        with open("/proc/%s/stat" % pid) as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()  # [0] is field 3 (state): ppid [1], start [19]

def children():
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        fields = stat(pid)
        if fields and fields[1] == raylet:
            found[pid] = fields[19]
    return found

first = stat(raylet)
born = first[19] if first else None
seen = {}
while born is not None:
    seen.update(children())
    if select.select([0], [], [], 1.0)[0] and not os.read(0, 65536):
        break  # the driver is gone
    now = stat(raylet)
    if not now or now[19] != born:
        break  # the raylet is gone
time.sleep(grace)
for sig in (signal.SIGTERM, signal.SIGKILL):
    for pid, start in seen.items():
        fields = stat(pid)
        if fields and fields[19] == start and fields[0] != "Z":
            try:
                os.kill(int(pid), sig)
            except OSError:
                pass
    time.sleep(1)
"""
_watchers: list[subprocess.Popen] = []  # their stdin must stay open as long as this process


def _watch_node() -> None:
    """Start the watcher that ends the Ray processes a killed driver leaves (see module doc)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        from ray._private import worker

        raylet = worker._global_node.all_processes["raylet"][0].process.pid
    except (AttributeError, KeyError, IndexError, TypeError) as err:  # Ray internals moved
        logger.debug("No watcher for Ray's agents: %s", err)
        return
    _watchers.append(
        subprocess.Popen(
            [sys.executable, "-S", "-c", _WATCHER, str(raylet), str(WATCH_GRACE_S)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C meant for the driver must not end it
        )
    )


# Ray 2.60's logger for "Token authentication is enabled for this Ray cluster ..."
_TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"


def _ray_logging_level() -> int:
    """The level of Ray's own loggers: INFO when segcal logs INFO (-v), else WARNING.

    Also quiets Ray's notice that token authentication is on (a warning Ray prints whenever
    ``RAY_AUTH_MODE`` is unset; the runtime segcal starts keeps Ray's default, token auth on),
    so a run without -v prints only what needs the user. ``ray.init`` sets the ``ray`` logger's
    level itself (its ``logging_level``), so `init_ray` passes this level on.
    """
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        return logging.INFO
    import ray.data  # noqa: F401  (its logger is configured on import)

    for name in ("ray", "ray.data", "ray.train", "ray.tune"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger(_TOKEN_AUTH_LOGGER).setLevel(logging.ERROR)
    return logging.WARNING


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
    level = _ray_logging_level()
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address and address != "local":
        ray.init(logging_level=level)  # reads RAY_ADDRESS
        return
    if bind_mode() == "all":
        logger.warning("%s=all: the local Ray runtime listens on every network interface", BIND_ENV)
        ray.init(address="local", logging_level=level)
        _watch_node()
        return
    _keep_on_loopback()
    ray.init(address="local", dashboard_host=LOOPBACK, logging_level=level)
    _watch_node()
