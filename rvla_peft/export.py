"""``python -m rvla_peft.export``: merge an adapter into its base (also ``rvla-export``). The command lives in
:mod:`rvla_peft.cli.export`."""

import sys

from rvla_peft.cli.export import main

if __name__ == "__main__":
    sys.exit(main())
