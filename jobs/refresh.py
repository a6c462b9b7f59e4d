"""The nightly refresh as a Ray job: extract what is new, refit, evaluate, promote.

Local (Ray starts on this machine, or joins the cluster at RAY_ADDRESS when set)::

    python jobs/refresh.py configs/camvid_espnet.yaml [--set key=value ...] \
        --registry /mnt/segcal/registry

Cluster (after ``ray up cluster.yaml`` and, in another shell, ``ray dashboard cluster.yaml``)::

    segcal submit configs/camvid_espnet.yaml refresh --address http://127.0.0.1:8265 --follow \
        -- --registry /mnt/segcal/registry

or with Ray's own CLI::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/refresh.py configs/camvid_espnet.yaml \
        --registry /mnt/segcal/registry

Arguments, exit codes and the ``ray.init()`` call are those of ``segcal refresh``
(pipeline/cli.py).
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["refresh", *sys.argv[1:]]))
