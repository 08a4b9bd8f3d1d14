"""`python -m convlower`: the same command line as the `convlower` console script."""

import sys

from .cli import main

sys.exit(main())
