import pytest
import torch

from ats_vit.stats import binomial_ci95, bootstrap_ci95, paired_bootstrap


def test_the_bootstrap_of_independent_items_is_the_binomial_interval():
    correct = torch.rand(4000, generator=torch.Generator().manual_seed(0)) < 0.85
    accuracy = correct.float().mean().item()
    assert bootstrap_ci95(correct, torch.arange(4000)) == pytest.approx(
        binomial_ci95(accuracy, 4000), rel=0.1
    )


def test_copies_of_an_item_count_once():
    """Three placements of each of 1000 digits: the interval of 1000 items, not 3000 images."""
    per_item = torch.rand(1000, generator=torch.Generator().manual_seed(1)) < 0.9
    correct, items = per_item.repeat(3), torch.arange(3000) % 1000
    accuracy = correct.float().mean().item()
    half = bootstrap_ci95(correct, items)
    assert half == pytest.approx(binomial_ci95(accuracy, 1000), rel=0.1)
    assert half > 1.5 * binomial_ci95(accuracy, 3000)


def test_paired_bootstrap_finds_a_real_difference_and_not_a_tie():
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(3000, generator=gen) < 0.9
    b = a.clone()
    b[torch.randperm(3000, generator=gen)[:90]] = False  # b is wrong on 90 more images (3 points)
    diff, p = paired_bootstrap(a, b, torch.arange(3000))
    assert diff == pytest.approx((a.double().mean() - b.double().mean()).item(), rel=1e-9) and p < 0.01
    swapped = b.clone()
    right, wrong = b.nonzero().flatten(), (~b).nonzero().flatten()
    swapped[right[:20]] = False  # 20 images turn wrong and 20 turn right: no systematic difference
    swapped[wrong[:20]] = True
    _, p_tie = paired_bootstrap(swapped, b, torch.arange(3000))
    assert p_tie > 0.05
    assert paired_bootstrap(a, a, torch.arange(3000)) == (0.0, 1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="must be non-empty and alike"):
        bootstrap_ci95(torch.ones(3, dtype=torch.bool), torch.arange(4))
    with pytest.raises(ValueError, match="must be alike"):
        paired_bootstrap(torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool), torch.arange(3))
