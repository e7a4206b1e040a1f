"""``python -m dashboard``: the ops app (Procfile process type ``ops``)."""

from __future__ import annotations

import sys

from .serve import main

sys.exit(main())
