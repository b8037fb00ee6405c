"""``python -m distill.cli``."""
import sys

from . import main

sys.exit(main())
