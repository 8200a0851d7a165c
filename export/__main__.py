"""``python -m mlxgpt_export ...`` is ``mlxgpt-ort ...``."""

import sys

from mlxgpt_export.cli import main

sys.exit(main())
