import pytest
import torch

from nern.errors import NernError
from nern.sampling import KernelSampler

OFFSETS = [0, 100, 300, 1000]


def make(method, batch=64, norms=None, **kw):
    norms = norms if norms is not None else torch.ones(OFFSETS[-1])
    return KernelSampler(method, batch, OFFSETS, norms, seed=3, **kw)


def test_all_returns_none():
    assert make("all").sample() is None


def test_random_batch_unique_and_size():
    s = make("random_batch")
    draws = [s.sample() for _ in range(50)]
    for idx in draws:
        assert len(idx) == 64 and len(set(idx.tolist())) == 64
        assert 0 <= int(idx.min()) and int(idx.max()) < OFFSETS[-1]
    assert not torch.equal(draws[0], draws[1])  # a fresh subset every iteration
    seen = torch.cat(draws).bincount(minlength=OFFSETS[-1])
    assert (seen > 0).float().mean() > 0.9  # uniform over all 1,000 kernels (50 x 64 draws cover ~96%)


def test_without_replacement_covers_everything_once_per_pass():
    s = make("random_batch_without_replacement", batch=100)
    seen = torch.cat([s.sample() for _ in range(10)])
    assert sorted(seen.tolist()) == list(range(1000))


def test_sequential_layer_cycles_layers():
    s = make("sequential_layer")
    for layer in [0, 1, 2, 0]:
        assert torch.equal(s.sample(), torch.arange(OFFSETS[layer], OFFSETS[layer + 1]))


def test_random_layer_is_a_whole_layer():
    s = make("random_layer")
    layers = [torch.arange(OFFSETS[i], OFFSETS[i + 1]) for i in range(3)]
    picked = []
    for _ in range(30):
        idx = s.sample()
        picked.append(next(i for i, layer in enumerate(layers) if torch.equal(idx, layer)))
    assert set(picked) == {0, 1, 2} and picked != sorted(picked)  # every layer, in no fixed order


def test_weighted_batch_mixture_and_magnitude_bias():
    norms = torch.ones(1000)
    norms[:10] = 1000.0  # 10 big kernels hold ~91% of the mass
    s = make("random_weighted_batch", batch=200, norms=norms, uniform_prob=0.8)
    uniform_draws, weighted_draws = 0, 0
    big_hits_weighted = 0
    for _ in range(400):
        idx = s.sample()
        if len(set(idx.tolist())) == len(idx) and (idx < 10).float().mean() < 0.5:
            uniform_draws += 1
        else:
            weighted_draws += 1
            big_hits_weighted += int((idx < 10).sum())
    assert 0.7 < uniform_draws / 400 < 0.9  # probability 0.8 of a uniform subset
    assert big_hits_weighted / (weighted_draws * 200) > 0.8  # proportional to the L2 norm


def test_state_roundtrip_reproduces_stream():
    a = make("random_weighted_batch")
    for _ in range(5):
        a.sample()
    b = make("random_weighted_batch")
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        x, y = a.sample(), b.sample()
        assert (x is None and y is None) or torch.equal(x, y)


def test_unknown_method_is_user_error():
    with pytest.raises(NernError, match="random_weighted_batch"):
        make("bogus")
