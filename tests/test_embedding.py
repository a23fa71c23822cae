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


def test_not_normalised():
    a = positional_embedding(torch.tensor([[0, 10, 0]]), 2, 0.5)
    assert math.isclose(a[0, 4].item(), math.sin(math.pi * 10), abs_tol=1e-5)
