import math

import torch

from nern.embedding import positional_embedding


def test_formula_layout_and_raw_integer_indices():
    coords = torch.tensor([[2, 5, 7], [0, 1, 3]])
    L, b = 4, 0.76
    emb = positional_embedding(coords, L, b)
    assert emb.shape == (2, 6 * L)
    for n in range(2):
        for axis in range(3):  # index-major: all 2L features of l, then f, then c
            p = int(coords[n, axis])
            for k in range(L):
                angle = math.pi * b**k * p
                assert math.isclose(emb[n, axis * 2 * L + 2 * k].item(), math.sin(angle), abs_tol=1e-6)
                assert math.isclose(emb[n, axis * 2 * L + 2 * k + 1].item(), math.cos(angle), abs_tol=1e-6)


def test_smooth_base_keeps_frequencies_below_pi_non_smooth_aliases():
    # b = 0.76: all frequencies pi*b^k <= pi; b = 1.25: 39 of 40 exceed pi on the integer grid.
    assert all(0.76**k <= 1 for k in range(40))
    assert sum(1.25**k > 1 for k in range(40)) == 39
    coords = torch.tensor([[0, 0, 0], [0, 0, 1]])
    smooth = positional_embedding(coords, 40, 0.76)
    rough = positional_embedding(coords, 40, 1.25)
    # neighbouring integer coordinates are closer under the smooth embedding
    assert (smooth[0] - smooth[1]).norm() < (rough[0] - rough[1]).norm()


# b = 1/2 puts every angle pi * p / 2^k on a multiple of pi/4, so the expected values can be written out by hand:
# (sin, cos) of pi, pi/2, pi/4 for p = 1; 2pi, pi, pi/2 for p = 2; 3pi, 3pi/2, 3pi/4 for p = 3.
R = math.sqrt(0.5)
BY_HAND = {
    1: [0.0, -1.0, 1.0, 0.0, R, R],
    2: [0.0, 1.0, 0.0, -1.0, 1.0, 0.0],
    3: [0.0, -1.0, -1.0, 0.0, R, -R],
}


def test_values_by_hand_index_major_and_sin_cos_interleaved():
    """(l, f, c) = (1, 2, 3), L = 3, b = 1/2: all 2L features of l, then f, then c; per level sin then cos.
    Every axis has its own values, so a swapped axis, a level-major layout or swapped sin/cos all change them."""
    emb = positional_embedding(torch.tensor([[1, 2, 3], [3, 1, 2]]), 3, 0.5)
    assert torch.allclose(emb[0], torch.tensor(BY_HAND[1] + BY_HAND[2] + BY_HAND[3]), atol=1e-6)
    assert torch.allclose(emb[1], torch.tensor(BY_HAND[3] + BY_HAND[1] + BY_HAND[2]), atol=1e-6)
    assert emb.dtype == torch.float32


def test_not_normalised():
    """Raw integers: p = 10 at b = 1/2, L = 5 gives angles 10pi, 5pi, 5pi/2, 5pi/4, 5pi/8 (nowhere all zero),
    which a coordinate scaled into [0, 1] (or zeroed) would not."""
    emb = positional_embedding(torch.tensor([[0, 10, 0]]), 5, 0.5)
    expected = []
    for angle in (10 * math.pi, 5 * math.pi, 2.5 * math.pi, 1.25 * math.pi, 0.625 * math.pi):
        expected += [math.sin(angle), math.cos(angle)]
    assert torch.allclose(emb[0, 10:20], torch.tensor(expected), atol=1e-5)
    assert emb[0, 10:20].abs().sum() > 5  # 0, 1, 0, -1, 1, 0, -0.71, -0.71, 0.92, -0.38
    zero = [0.0, 1.0] * 5  # p = 0: every sine 0, every cosine 1
    assert torch.equal(emb[0, :10], torch.tensor(zero)) and torch.equal(emb[0, 20:], torch.tensor(zero))
