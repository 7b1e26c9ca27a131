"""The ``openvla`` family: the action-token policy with an OpenVLA checkpoint's own action ids, statistics and prompt.
``configuration`` (light: its policy section and LoRA defaults) and ``modeling`` (the policy)."""
