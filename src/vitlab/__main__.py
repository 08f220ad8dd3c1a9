"""``python -m vitlab`` (also what ``torchrun -m vitlab`` runs)."""

import sys

from .cli import main

sys.exit(main())
