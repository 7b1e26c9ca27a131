"""Policy families over pretrained VLAs: the contract (:mod:`rvla_peft.policies.base`), one folder per family
(``<family>/configuration.py``: its ``policy:`` keys and LoRA defaults; ``<family>/modeling.py``: the policy), the
light catalogue (:mod:`rvla_peft.policies.families`) and :mod:`rvla_peft.policies.registry` (``build_policy``,
``load_policy``).

This package's ``__init__`` imports nothing (nor do the families' ``__init__``), so that light modules (the catalogue
and the families' configurations, read by the config) load without torch or transformers.
"""
