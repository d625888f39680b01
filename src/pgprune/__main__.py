"""`python -m pgprune ...` runs the `pgprune` command (the usual way to hand a package to `torchrun -m`)."""

import sys

from pgprune.cli import main

sys.exit(main())
