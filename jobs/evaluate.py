"""Stage 3 as a Ray job: evaluate every calibrator on every dataset, write the tables.

Local (Ray starts on this machine, or joins the cluster at RAY_ADDRESS when set)::

    python jobs/evaluate.py configs/camvid_espnet.yaml [--set key=value ...]

Cluster (after ``ray up cluster.yaml`` and, in another shell, ``ray dashboard cluster.yaml``)::

    segcal submit configs/camvid_espnet.yaml evaluate --address http://127.0.0.1:8265 --follow

or with Ray's own CLI::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/evaluate.py configs/camvid_espnet.yaml

Arguments, exit codes and the ``ray.init()`` call are those of ``segcal evaluate``
(pipeline/cli.py).
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
