"""``python -m domaingrad`` is the ``domaingrad`` command."""

import sys

from .cli import main

sys.exit(main())
