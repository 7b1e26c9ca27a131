"""Policy families over pretrained VLAs: the contract (:mod:`rvla_peft.policies.base`), one module per family, and
:mod:`rvla_peft.policies.registry` (``build_policy``, ``load_policy``).

This package's ``__init__`` imports nothing, so that light modules (the family catalogue read by the config) load
without torch or transformers.
"""
