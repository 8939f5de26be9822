"""``python -m equiopt`` = the ``equiopt`` command."""
import sys

from .cli import main

sys.exit(main())
