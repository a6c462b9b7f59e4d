"""Write the Markdown/HTML report from the evaluation tables (no Ray needed).

Local (Ray starts on this machine, or joins the cluster at RAY_ADDRESS when set)::

    python jobs/report.py configs/camvid_espnet.yaml [--set key=value ...]

Cluster (after ``ray up cluster.yaml`` and, in another shell, ``ray dashboard cluster.yaml``)::

    segcal submit configs/camvid_espnet.yaml report --address http://127.0.0.1:8265 --follow

or with Ray's own CLI::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/report.py configs/camvid_espnet.yaml

Arguments, exit codes and the ``ray.init()`` call are those of ``segcal report``
(pipeline/cli.py).
"""

from __future__ import annotations

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["report", *sys.argv[1:]]))
