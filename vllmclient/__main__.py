"""``python -m vllmclient run ...`` / ``python -m vllmclient serve ...``."""

import sys

from .cli import main

sys.exit(main())
