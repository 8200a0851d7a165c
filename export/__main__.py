"""``python -m export ...`` is ``mlxgpt-ort ...``."""

import sys

from export.cli import main

sys.exit(main())
