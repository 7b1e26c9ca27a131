"""``python -m rvla_peft.hub push|card``: the command lives in :mod:`rvla_peft.cli.hub` (also ``rvla-hub``)."""

import sys

from rvla_peft.cli.hub import main

sys.exit(main())
