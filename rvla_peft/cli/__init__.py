"""The command lines, one module per command, each a console script (``rvla-train``, ``rvla-eval``, ...); the
``python -m rvla_peft.<command>`` forms run the same ``main``."""
