"""``python -m rvla_peft.eval``: the robustness report (also ``rvla-eval``). The command lives in
:mod:`rvla_peft.cli.eval`."""

import sys

from rvla_peft.cli.eval import main

if __name__ == "__main__":
    sys.exit(main())
