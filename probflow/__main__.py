"""`python -m probflow …` is the `probflow` command."""

import sys

from probflow.cli import main

sys.exit(main())
