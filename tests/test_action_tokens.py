import numpy as np
import torch

from rvla_peft.policies.action_tokens.tokenizer import ActionTokenizer


def openvla_reference(vocab_size: int, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenVLA's ActionTokenizer (prismatic/vla/action_tokenizer.py), written out with numpy."""
    bins = np.linspace(-1, 1, 256)
    centres = (bins[:-1] + bins[1:]) / 2.0
    token_ids = vocab_size - np.digitize(np.clip(actions, -1, 1), bins)
    decoded = centres[np.clip(vocab_size - token_ids - 1, 0, centres.shape[0] - 1)]
    return token_ids, decoded


def test_matches_openvla_encoding_and_decoding():
    tok = ActionTokenizer(vocab_size=32000)
    rng = np.random.default_rng(0)
    actions = np.concatenate([rng.uniform(-1.2, 1.2, (500, 7)), [[-1, 1, 0, -0.9999, 0.9999, 1.5, -1.5]]])
    ref_ids, ref_decoded = openvla_reference(32000, actions)
    slots = tok.encode(torch.tensor(actions, dtype=torch.float32))
    assert torch.equal(slots + tok.first_id, torch.tensor(ref_ids))
    np.testing.assert_allclose(tok.slot_to_normalized(slots).numpy(), ref_decoded, atol=1e-6)


def test_expected_action_and_unnormalize():
    tok = ActionTokenizer(vocab_size=512, low=[0.0] * 7, high=[2.0] * 7)
    probs = torch.zeros(1, 7, 256)
    probs[..., 0] = 0.5  # slot 0 = the top bin
    probs[..., 255] = 0.5  # slot 255 = the bottom bin
    mean = tok.expected_normalized(probs)
    torch.testing.assert_close(mean, torch.zeros(1, 7), atol=1e-6, rtol=0)
    torch.testing.assert_close(
        tok.unnormalize(torch.tensor([[-1.0] * 7, [1.0] * 7])), torch.tensor([[0.0] * 7, [2.0] * 7])
    )


def test_vocab_must_exceed_bins():
    import pytest

    with pytest.raises(ValueError, match="vocab_size"):
        ActionTokenizer(vocab_size=200)
