"""The ``pi0`` family: PPO over the flow-SDE denoising chain of transformers' PI0.
``configuration`` (light: its policy section and LoRA defaults), ``modeling`` (the policy and the flow-SDE maths)."""
