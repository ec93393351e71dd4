import itertools
import math

import pytest
import torch

from ats_vit.stats import adjust_bh, binomial_ci95, bootstrap_ci95, paired_bootstrap, paired_test


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


def test_the_paired_test_finds_a_real_difference_and_not_a_tie():
    gen = torch.Generator().manual_seed(2)
    a = torch.rand(3000, generator=gen) < 0.9
    b = a.clone()
    b[torch.randperm(3000, generator=gen)[:90]] = False  # b is wrong on 90 more images (3 points)
    diff, p = paired_test(a, b, torch.arange(3000))
    assert diff == pytest.approx((a.double().mean() - b.double().mean()).item(), rel=1e-9) and p < 1e-20
    swapped = b.clone()
    right, wrong = b.nonzero().flatten(), (~b).nonzero().flatten()
    swapped[right[:20]] = False  # 20 images turn wrong and 20 turn right: no systematic difference
    swapped[wrong[:20]] = True
    diff, p = paired_test(swapped, b, torch.arange(3000))
    assert diff == 0.0 and p == pytest.approx(1.0, abs=1e-9)
    assert paired_test(a, a, torch.arange(3000)) == (0.0, 1.0)


def test_with_one_image_per_item_the_paired_test_is_the_exact_mcnemar_test():
    """8 images only a gets right, 3 only b: the two-sided exact binomial test on 11 discordant pairs."""
    a = torch.zeros(200, dtype=torch.bool)
    b = a.clone()
    a[:8], b[8:11] = True, True
    a[50:150], b[50:150] = True, True  # concordant pairs do not count
    diff, p = paired_test(a, b, torch.arange(200))
    mcnemar = 2 * sum(math.comb(11, j) for j in range(0, 4)) / 2**11
    assert diff == pytest.approx(5 / 200) and p == pytest.approx(mcnemar, rel=1e-12)


def test_the_paired_test_over_clusters_is_the_exact_sign_flip_test():
    """Items of up to three images: p is the share of all 2^items sign patterns of the per-item
    differences at least as far from zero as the measured sum (enumerated here)."""
    per_item = [2, -1, 3, 1, 1, -2, 3, 1, 0, 2]  # a's minus b's correct images, per item
    a, b, items = [], [], []
    for item, d in enumerate(per_item):
        for image in range(3):  # image k: a right when k < max(d, 0), b right when k < max(-d, 0)
            a.append(image < max(d, 0))
            b.append(image < max(-d, 0))
            items.append(item)
    diff, p = paired_test(torch.tensor(a), torch.tensor(b), torch.tensor(items))
    nonzero = [abs(d) for d in per_item if d]
    observed = abs(sum(per_item))
    reach = sum(
        1
        for s in itertools.product((-1, 1), repeat=len(nonzero))
        if abs(sum(x * m for x, m in zip(s, nonzero, strict=True))) >= observed
    )
    assert diff == pytest.approx(sum(per_item) / 30)
    assert p == pytest.approx(reach / 2 ** len(nonzero), rel=1e-12)


def test_the_paired_test_has_no_resampling_floor():
    """A difference that a hundred comparisons' correction must still find: 60 images only a
    gets right give p = 2^-59, far below 0.05 / 100 (a 2,000-round bootstrap stops at 5e-4)."""
    a, b = torch.ones(100, dtype=torch.bool), torch.ones(100, dtype=torch.bool)
    b[:60] = False
    assert paired_test(a, b, torch.arange(100))[1] == pytest.approx(2.0**-59)


def test_benjamini_hochberg_adjusts_like_the_textbook_and_skips_comparisons_not_made():
    p = [0.01, 0.04, math.nan, 0.03, 0.5, 0.001]
    adjusted = adjust_bh(p)
    # sorted 0.001, 0.01, 0.03, 0.04, 0.5 (m = 5): p * m / rank, then the running minimum from the top
    expected = [0.025, 0.05, math.nan, 0.05, 0.5, 0.005]
    assert all(
        (math.isnan(x) and math.isnan(y)) or x == pytest.approx(y)
        for x, y in zip(adjusted, expected, strict=True)
    )
    assert adjust_bh([]) == []
    assert adjust_bh([0.2]) == [0.2]
    with pytest.raises(ValueError, match=r"p-values must be in \[0, 1\]"):
        adjust_bh([0.1, 1.5])


def test_the_paired_bootstrap_is_deprecated():
    a = torch.ones(10, dtype=torch.bool)
    with pytest.warns(DeprecationWarning, match="paired_test"):
        assert paired_bootstrap(a, a, torch.arange(10)) == (0.0, 1.0)


def test_bad_inputs():
    with pytest.raises(ValueError, match="must be non-empty and alike"):
        bootstrap_ci95(torch.ones(3, dtype=torch.bool), torch.arange(4))
    with pytest.raises(ValueError, match="must be non-empty and alike"):
        paired_test(torch.ones(3, dtype=torch.bool), torch.ones(2, dtype=torch.bool), torch.arange(3))
    with pytest.raises(ValueError, match="must be non-empty and alike"):
        paired_test(torch.ones(0, dtype=torch.bool), torch.ones(0, dtype=torch.bool), torch.arange(0))
