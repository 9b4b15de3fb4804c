import pytest
import torch

from adapter_core.memory.normalize import normalize


@pytest.mark.parametrize("method", ["svd", "polar", "frobenius"])
def test_zero_sum_gives_zero_memory_without_nan(method):
    m = normalize(torch.zeros(3, 5, 5), method)
    assert torch.equal(m, torch.zeros(3, 5, 5))


@pytest.mark.parametrize("method", ["svd", "polar"])
def test_polar_factor_is_orthogonal_and_scale_free(method):
    s = torch.randn(4, 6, 6, generator=torch.Generator().manual_seed(0))
    m = normalize(s, method, polar_steps=30)
    eye = torch.eye(6).expand(4, 6, 6)
    assert torch.allclose(m @ m.transpose(-1, -2), eye, atol=1e-3)
    assert torch.allclose(normalize(1000 * s, method, polar_steps=30), m, atol=1e-3)


def test_newton_schulz_matches_exact_svd():
    s = torch.randn(8, 16, 16, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(normalize(s, "polar", polar_steps=40), normalize(s, "svd"), atol=1e-3)


def test_rank_deficient_sum_keeps_only_its_directions():
    # Sum of two outer products: rank 2. Arbitrary directions must not be promoted to 1.
    # (Newton-Schulz grows tiny singular values by 1.5x a step, so rounding noise stays small
    # only for a moderate number of steps: the default 12.)
    k = torch.randn(2, 5, generator=torch.Generator().manual_seed(2))
    s = k.T @ k
    for method in ("svd", "polar"):
        sigma = torch.linalg.svdvals(normalize(s, method))
        assert torch.allclose(sigma[:2], torch.ones(2), atol=1e-3), method
        assert sigma[2:].abs().max() < 1e-3, method


def test_frobenius_has_unit_norm():
    s = torch.randn(5, 5)
    assert torch.linalg.matrix_norm(normalize(s, "frobenius")).item() == pytest.approx(1.0, abs=1e-5)


def test_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown normalization 'qr'"):
        normalize(torch.ones(2, 2), "qr")
