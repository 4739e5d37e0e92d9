"""``python -m stowd``."""

import sys

from stowd.cli import main

sys.exit(main())
