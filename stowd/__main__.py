"""``python -m stowd``."""

import sys

from stowd.commands.cli import main

sys.exit(main())
