"""The ``action_tokens`` family: OpenVLA-style action tokens over any image-text-to-text model.
``configuration`` (light: its policy section and LoRA defaults), ``tokenizer`` and ``modeling`` (the policy)."""
