"""``python -m rvla_peft.train``: train a robust LoRA adapter (also ``rvla-train``). The command lives in
:mod:`rvla_peft.cli.train`."""

import sys

from rvla_peft.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
