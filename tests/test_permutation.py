"""Coordinate permutations (nern/permutation.py) and the chains behind them (nern/chain.py): the paper's
greedy chains, the fast chain, and the stored file format."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from nern import chain as C
from nern import permutation as P
from nern.artifacts import load_tensors, save_tensors
from nern.errors import NernError


def _angles(*degrees: float) -> torch.Tensor:
    """Unit 2-D vectors at the given angles: cosine similarity is the cosine of the angle between them."""
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    return torch.stack([rad.cos(), rad.sin()], dim=1).float()


def _reference_greedy(vectors: torch.Tensor, start: int = 0) -> list[int]:
    """The paper's description, written as plainly as possible (float64, Python loops)."""
    v = vectors.double().reshape(len(vectors), -1)
    norms = v.norm(dim=1)
    unit = [v[i] / norms[i] if norms[i] > 0 else v[i] * 0 for i in range(len(v))]
    chain, left = [start], set(range(len(v))) - {start}
    while left:
        cur = chain[-1]
        best = max(sorted(left), key=lambda j: float(unit[cur] @ unit[j]))  # max keeps the first: lowest index
        chain.append(best)
        left.remove(best)
    return chain


def _reference_infilter(weight: torch.Tensor) -> torch.Tensor:
    cout, cin = weight.shape[:2]
    kernels = weight.double().reshape(cout, cin, -1)
    unit = kernels / kernels.norm(dim=2, keepdim=True)
    pis = [_reference_greedy(kernels[f]) for f in range(cout)]
    ranked = torch.stack([unit[f, pis[f]].reshape(-1) for f in range(cout)])  # sum_c cos(...) = dot of these
    chain, left = [0], set(range(1, cout))
    while left:
        best = max(sorted(left), key=lambda g: float(ranked[chain[-1]] @ ranked[g]))
        chain.append(best)
        left.remove(best)
    position = torch.empty(cout * cin, dtype=torch.long)
    for frank, f in enumerate(chain):
        for crank, c in enumerate(pis[f]):
            position[f * cin + c] = frank * cin + crank
    return position


def _random_weight(cout: int, cin: int, k: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(cout, cin, k, k, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------ chains


def test_greedy_chain_on_hand_made_angles():
    # from 0 deg: 10 is closest, then 50, then 100, then 200
    vectors = _angles(0, 100, 10, 50, 200)
    assert C.greedy_chain(vectors).tolist() == [0, 2, 3, 1, 4]
    assert C.greedy_chain(vectors, start=4).tolist() == [4, 1, 3, 2, 0]


def test_greedy_chain_breaks_ties_by_lowest_index_and_treats_zero_kernels_as_cosine_zero():
    vectors = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, 0.0], [0.0, 2.0]])
    # from 0: 2, 3 (zero kernel) and 4 all have cosine 0 -> 2; from 2: 4 (cosine 1);
    # from 4: 1 and the zero kernel 3 both have cosine 0 -> 1; then 3
    assert C.greedy_chain(vectors).tolist() == [0, 2, 4, 1, 3]


def test_greedy_chain_matches_plain_reference():
    vectors = torch.randn(60, 9, generator=torch.Generator().manual_seed(3))
    assert C.greedy_chain(vectors).tolist() == _reference_greedy(vectors)
    assert C.greedy_chain(vectors, start=17).tolist() == _reference_greedy(vectors, start=17)


def test_greedy_chain_rejects_a_start_outside_the_vectors():
    with pytest.raises(NernError, match="start"):
        C.greedy_chain(torch.randn(4, 9), start=4)


def test_crossfilter_position_is_the_inverse_of_the_greedy_chain():
    weight = _angles(0, 100, 10, 50, 200, 60).reshape(2, 3, 1, 2)
    chain = [0, 2, 3, 5, 1, 4]  # 0 -> 10 -> 50 -> 60 -> 100 -> 200
    position = P.crossfilter_permutation(weight, method="greedy")
    assert position.tolist() == [0, 4, 1, 2, 5, 3]
    assert [position[i] for i in chain] == list(range(6))


def test_infilter_ranks_channels_inside_filters_and_filters_by_summed_cosine():
    # filter 0: channels at 0, 90, 20 -> pi_0 = [0, 2, 1]; filter 1: 180, 10, 95 -> [0, 2, 1];
    # filter 2: 5, 100, 30 -> [0, 2, 1]. Ranked rows: f0 (0, 20, 90), f1 (180, 95, 10), f2 (5, 30, 100);
    # from f0, f2 is far closer than f1, so filters rank f0, f2, f1.
    weight = _angles(0, 90, 20, 180, 10, 95, 5, 100, 30).reshape(3, 3, 1, 2)
    position = P.infilter_permutation(weight)
    expected = [0, 2, 1, 6, 8, 7, 3, 5, 4]
    assert position.tolist() == expected
    assert position.tolist() == _reference_infilter(weight).tolist()


def test_infilter_matches_plain_reference_on_random_weights():
    weight = _random_weight(12, 7, seed=5)
    assert P.infilter_permutation(weight).tolist() == _reference_infilter(weight).tolist()


@pytest.mark.parametrize("mode", P.MODES)
@pytest.mark.parametrize("shape", [(16, 3, 3, 3), (1, 5, 3, 3), (7, 1, 3, 3), (32, 16, 1, 1), (24, 40, 3, 3)])
def test_every_permutation_is_a_bijection(mode, shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    for method in (m for m in P.METHODS if m != "lkh"):  # lkh: tested on its own below (seconds per layer)
        position = P.layer_permutation(weight, mode, method)
        assert P.is_bijection(position, shape[0] * shape[1])


def test_fast_chain_is_a_bijection_with_zero_and_duplicate_kernels_and_ends_with_the_zero_ones():
    vectors = torch.randn(300, 9, generator=torch.Generator().manual_seed(2))
    vectors[10:20] = 0
    vectors[50:60] = vectors[60:70]
    chain = C.fast_chain(vectors)
    assert sorted(chain.tolist()) == list(range(300))
    assert sorted(chain[-10:].tolist()) == list(range(10, 20))


def test_routing_weights_through_a_permutation_and_back_is_bit_identical():
    weight = _random_weight(8, 6, seed=4)
    x = torch.randn(2, 6, 10, 10, generator=torch.Generator().manual_seed(5))
    for mode in ("infilter", "crossfilter"):
        position = P.layer_permutation(weight, mode)
        kernels = weight.reshape(48, 3, 3)
        slots = torch.empty_like(kernels)
        slots[position] = kernels  # kernel i sits on grid slot position[i]
        back = slots[position].reshape_as(weight)  # and is read back from there
        assert torch.equal(F.conv2d(x, back, padding=1), F.conv2d(x, weight, padding=1))


def test_approximate_neighbours_are_true_similarities_without_self_and_find_most_true_neighbours():
    unit = C.unit_rows(torch.randn(12000, 9, generator=torch.Generator().manual_seed(11)))
    unit[100:110] = unit[110:120]  # duplicates: the twin, not the row itself, must come first
    idx, sim = C._approximate_neighbours(unit, 8, seed=0)
    exact_idx, _ = C._exact_neighbours(unit, 8)
    rows = torch.arange(unit.shape[0]).unsqueeze(1)
    found = sim > -torch.inf
    assert not (idx[found] == rows.expand_as(idx)[found]).any()
    assert torch.allclose(sim[found], (unit[rows.expand_as(idx)] * unit[idx]).sum(-1)[found], atol=1e-5)
    assert (sim[:, :-1] >= sim[:, 1:]).all()
    assert torch.equal(idx[100:110, 0], torch.arange(110, 120))
    recall = (idx.unsqueeze(2) == exact_idx.unsqueeze(1)).any(2).float().mean()
    assert recall > 0.85  # about 0.91 on Gaussian kernels with 8 probes


def test_lkh_chain_finds_the_best_chain_of_a_tiny_set():
    vectors = torch.randn(7, 9, generator=torch.Generator().manual_seed(12))
    chain = C.lkh_chain(vectors, time_limit_s=1.0)
    best = max(C.chain_quality(vectors, torch.tensor(order)) for order in itertools.permutations(range(7)))
    assert sorted(chain.tolist()) == list(range(7))
    assert C.chain_quality(vectors, chain) == pytest.approx(best, abs=1e-4)  # distances rounded to 1e-5


def test_lkh_chain_is_a_valid_chain_at_least_as_good_as_fast_and_greedy_on_a_small_layer():
    kernels = _random_weight(16, 16, seed=13).reshape(256, 9)
    kernels[5:9] = 0
    chain = C.lkh_chain(kernels, time_limit_s=2.0)
    assert sorted(chain.tolist()) == list(range(256))
    lkh = C.chain_quality(kernels, chain)
    assert lkh >= C.chain_quality(kernels, C.fast_chain(kernels))
    assert lkh >= C.chain_quality(kernels, C.greedy_chain(kernels))
    assert P.is_bijection(P.layer_permutation(kernels.reshape(16, 16, 3, 3), "crossfilter", "lkh"), 256)


def test_lkh_refuses_layers_whose_distance_matrix_is_too_large():
    with pytest.raises(NernError, match="lkh.*fast"):
        C.lkh_chain(torch.zeros(C.LKH_MAX + 1, 9))


# ---------------------------------------------------------------------------------- quality and speed


def test_chain_quality_is_the_mean_cosine_of_consecutive_vectors():
    vectors = _angles(0, 60, 180)
    assert C.chain_quality(vectors, torch.tensor([0, 1, 2])) == pytest.approx((0.5 - 0.5) / 2)
    assert C.chain_quality(vectors, torch.tensor([2, 1, 0])) == pytest.approx(0.0)
    assert C.chain_quality(vectors, torch.tensor([1, 0, 2])) == pytest.approx((0.5 - 1.0) / 2)


@pytest.mark.parametrize("cout,cin", [(64, 64), (128, 128)])
def test_fast_chain_is_at_least_as_good_as_the_paper_greedy(cout, cin):
    kernels = _random_weight(cout, cin, seed=7).reshape(cout * cin, 9)
    fast, greedy = C.fast_chain(kernels), C.greedy_chain(kernels)
    assert sorted(fast.tolist()) == list(range(cout * cin))
    assert C.chain_quality(kernels, fast) >= C.chain_quality(kernels, greedy)


def test_auto_is_never_worse_than_greedy_on_small_layers():
    weight = _random_weight(16, 16, seed=8)
    kernels = weight.reshape(256, 9)
    auto = P.chain_of_positions(P.crossfilter_permutation(weight, "auto"))
    greedy = C.greedy_chain(kernels)
    assert C.chain_quality(kernels, auto) >= C.chain_quality(kernels, greedy)


def test_permutations_are_deterministic():
    kernels = _random_weight(96, 96, seed=9).reshape(-1, 9)  # 9216 kernels: the k-means path
    assert torch.equal(C.fast_chain(kernels, seed=3), C.fast_chain(kernels, seed=3))
    weight = _random_weight(20, 12, seed=10)
    for mode in ("infilter", "crossfilter"):
        assert torch.equal(P.layer_permutation(weight, mode), P.layer_permutation(weight, mode))


def test_unknown_mode_or_method_is_a_user_error_listing_the_choices():
    weight = _random_weight(4, 4)
    with pytest.raises(NernError, match="none, infilter, crossfilter"):
        P.layer_permutation(weight, "diagonal")
    with pytest.raises(NernError, match=", ".join(P.METHODS)):
        P.layer_permutation(weight, "crossfilter", method="magic")
    with pytest.raises(NernError, match="none, infilter, crossfilter"):
        P.compute_permutations([weight], "diagonal", progress=False)


def test_compute_permutations_gives_one_position_per_layer():
    weights = [_random_weight(4, 3, seed=1), _random_weight(6, 4, seed=2)]
    perms = P.compute_permutations(weights, "crossfilter", progress=False)
    assert [p.numel() for p in perms] == [12, 24]
    assert P.compute_permutations(weights, "none", progress=False)[1].tolist() == list(range(24))
    assert P.chain_quality_of_positions(weights, perms) > P.chain_quality_of_positions(
        weights, P.compute_permutations(weights, "none", progress=False))


# ---------------------------------------------------------------------------------------- storage


def _meta(shapes):
    return {"mode": "crossfilter", "layers": [f"conv{i}" for i in range(len(shapes))], "shapes": shapes}


def test_save_load_round_trip_stores_int16_when_it_fits_and_int32_otherwise(tmp_path):
    small = P.layer_permutation(_random_weight(8, 4), "crossfilter")
    large = torch.randperm(256 * 256, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "perm.safetensors"
    P.save_permutations(path, [small, large], _meta([[8, 4], [256, 256]]))
    perms, meta = P.load_permutations(path, expected_shapes=[(8, 4), (256, 256)])
    assert torch.equal(perms[0], small) and torch.equal(perms[1], large)
    assert perms[0].dtype == torch.long
    assert meta["num_layers"] == 2 and meta["shapes"] == [[8, 4], [256, 256]] and meta["mode"] == "crossfilter"
    raw, _ = load_tensors(path)
    assert raw["layer.0"].dtype == torch.int16 and raw["layer.1"].dtype == torch.int32
    assert P.permutation_bytes([small, large]) == 32 * 2 + 65536 * 4


def test_loading_against_a_different_model_names_the_first_mismatching_layer(tmp_path):
    path = tmp_path / "perm.safetensors"
    P.save_permutations(path, [P.identity_permutation(4, 3), P.identity_permutation(8, 4)], _meta([[4, 3], [8, 4]]))
    with pytest.raises(NernError, match=r"conv1 .*8x4.*8x8.*nern permute"):
        P.load_permutations(path, expected_shapes=[(4, 3), (8, 8)])
    with pytest.raises(NernError, match="layer 2.*no layer.*nern permute"):
        P.load_permutations(path, expected_shapes=[(4, 3), (8, 4), (8, 8)])


def test_loading_a_file_whose_positions_are_not_a_bijection_fails(tmp_path):
    path = tmp_path / "perm.safetensors"
    broken = torch.tensor([0, 1, 1, 3], dtype=torch.int16)
    save_tensors(path, {"layer.0": broken}, {**_meta([[2, 2]]), "num_layers": 1})
    with pytest.raises(NernError, match="conv0.*not a bijection.*nern permute"):
        P.load_permutations(path)
