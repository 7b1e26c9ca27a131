"""Gradient share per loss term (issue 15): exact against gradients computed one term at a time; calibrated weights
against the closed form; a penalty's random draws never change the rollouts (paired arms)."""

import json
from pathlib import Path

import pytest
import torch

from rvla_peft.algorithms.grad_share import calibrated_weights, grad_shares, term_grad_norms


def _terms(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    y = model(x)
    return {"policy": (y**2).mean(), "value": 0.5 * y.sum(), "jacobian": 3.0 * y[:, 0].abs().mean()}


def test_term_norms_equal_each_terms_own_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    x = torch.randn(5, 4)
    params = list(model.parameters())
    terms = _terms(model, x)
    norms = term_grad_norms(terms, params)
    for name in terms:  # a fresh graph and a plain backward per term
        model.zero_grad()
        _terms(model, x)[name].backward()
        expected = torch.sqrt(sum((p.grad**2).sum() for p in params)).item()
        assert norms[name] == pytest.approx(expected, rel=1e-6)
    total = sum(terms.values())
    total.backward()  # the graph is still there for the caller's own backward
    shares = grad_shares(norms)
    assert sum(shares.values()) == pytest.approx(1.0)
    assert shares["value"] == pytest.approx(norms["value"] / sum(norms.values()))
    frozen = torch.zeros((), requires_grad=False)
    assert term_grad_norms({"none": frozen}, params) == {"none": 0.0}


def test_calibrated_weights_put_each_penalty_at_its_share():
    weights = calibrated_weights({"policy": 2.5, "value": 0.5}, {"jacobian": 0.5, "smooth": 2.0}, share=0.2)
    assert weights == pytest.approx({"jacobian": 2.0, "smooth": 0.5})  # 0.2 x 3 / (0.6 x n)
    norms = {"policy": 2.5, "value": 0.5, "jacobian": 2.0 * 0.5, "smooth": 0.5 * 2.0}
    assert grad_shares(norms)["jacobian"] == pytest.approx(0.2) and grad_shares(norms)["smooth"] == pytest.approx(0.2)
    with pytest.raises(ValueError, match="must sum to less than 1"):
        calibrated_weights({"policy": 1.0}, {"a": 1.0, "b": 1.0}, share=0.5)


def _recorded_run(cfg):
    from rvla_peft.trainer import RobustPPOTrainer

    seen = []

    class Recording(RobustPPOTrainer):
        def update(self, rollout):
            seen.append((rollout.actions.clone(), rollout.rewards.clone(), rollout.log_probs.clone()))
            return super().update(rollout)

    Recording(cfg).train()
    return seen


def test_a_penalty_changes_no_rollout_and_its_share_is_logged(tiny_cfg):
    from accelerate.state import AcceleratorState

    tiny_cfg.total_updates, tiny_cfg.grad_share_every = 2, 2  # measured at update 1 of 2 only
    tiny_cfg.regularizers.jacobian.weight = 0.0
    off = _recorded_run(tiny_cfg)
    AcceleratorState._reset_state(reset_partial_state=True)
    tiny_cfg.regularizers.jacobian.weight = 1e-12  # on, but too small to move the weights measurably
    on = _recorded_run(tiny_cfg)
    for (a_off, r_off, _), (a_on, r_on, _) in zip(off, on, strict=True):
        assert torch.equal(a_off, a_on) and torch.equal(r_off, r_on), "the Hutchinson probes moved the sampling"
    lines = [json.loads(x) for x in (Path(tiny_cfg.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("grad/") for k in lines[1]), "grad_share_every=2 measured the second update too"
    shares = {k: v for k, v in lines[0].items() if k.startswith("grad/share_")}
    assert set(shares) == {"grad/share_policy", "grad/share_value", "grad/share_kl_to_base", "grad/share_jacobian",
                           "grad/share_smooth"}  # fmt: skip
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-5)
    assert 0 < shares["grad/share_jacobian"] < 1e-6  # 1e-12 x the penalty: present, negligible
