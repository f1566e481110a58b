"""``python -m hf_elsa ...``: the ``hf-elsa`` command."""

import sys

from .cli import main

sys.exit(main())
