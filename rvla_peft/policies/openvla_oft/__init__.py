"""The ``openvla_oft`` family: OpenVLA-OFT's parallel decoding with a continuous head and a learned scale.
``configuration`` (light: its policy section and LoRA defaults) and ``modeling`` (the policy and its heads)."""
