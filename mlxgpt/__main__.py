"""``python -m mlxgpt``: the ``mlxgpt`` command line.

Launchers start a named interpreter on every machine, so a distributed run is
``mlx.launch -n 2 -- /path/to/python -m mlxgpt train ...`` (see README, "Training on
several machines").
"""

import sys

from mlxgpt.cli import main

if __name__ == "__main__":
    sys.exit(main())
