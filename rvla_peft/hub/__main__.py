import sys

from rvla_peft.hub.cli import main

sys.exit(main())
