"""``python -m rvla_peft.serve --base MODEL --adapter ADAPTER``: the policy server (:mod:`rvla_peft.cli.serve`)."""

import sys

from rvla_peft.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
