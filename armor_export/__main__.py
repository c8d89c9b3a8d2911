"""``python -m armor_export`` = the ``armor-export`` command (also what torchrun launches)."""
import sys

from armor_export.cli import main

sys.exit(main())
