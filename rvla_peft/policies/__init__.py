from rvla_peft.policies.base import ActionSample, Policy, PolicyOutput, ValueHead
from rvla_peft.policies.registry import POLICY_FAMILIES, build_policy

__all__ = ["ActionSample", "Policy", "PolicyOutput", "ValueHead", "POLICY_FAMILIES", "build_policy"]
