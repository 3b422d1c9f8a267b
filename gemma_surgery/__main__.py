"""``python -m gemma_surgery`` runs the `gemma-surgery` command."""

import sys

from gemma_surgery.cli import main

sys.exit(main())
