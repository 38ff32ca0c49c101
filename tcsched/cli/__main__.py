"""``python -m tcsched.cli``: the ``tcsched`` command line."""

import sys

from tcsched.cli import main

sys.exit(main())
