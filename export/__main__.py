"""``python -m mlxgpt_export ...`` is ``mlxgpt-ort ...``."""

import sys

from mlxgpt_export.cli import main

if __name__ == "__main__":  # not when a spawned engine process imports this module
    sys.exit(main())
