"""`python -m covspec.cli ARGS`, as `covspec ARGS`."""

import sys

from covspec.cli import main

sys.exit(main())
