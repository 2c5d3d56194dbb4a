"""``python -m domaingrad`` is the ``domaingrad`` command."""

import sys

from .cli import console_main

sys.exit(console_main())
