"""batch_rng: a batch's draws are those of grain's per-element generators, to the bit."""

import grain
import numpy as np
import pytest

from vggjax.data import batch_rng, pipeline

_SEED = 2613022947
# Ranges with many rejections in Lemire's method (2**31 + 7: nearly half), none (2**32), one
# value (no draw), and the sizes the pipelines draw.
_SPANS = (5, 9, 2**31 + 7, 2**32, 1, 13, 2**31 + 7)


def _per_element(rng: np.random.Generator) -> list[float]:
    """Draws from one element's generator, as `_batched` draws them for a batch."""
    out = [float(rng.integers(-3, -3 + span)) for span in _SPANS[:4]]
    out.append(rng.random())
    out += [float(rng.integers(0, span)) for span in _SPANS[4:]]
    return out + [rng.random(), *rng.normal(0.0, 1.0, size=3)]


def _batched(rng: batch_rng.BatchRng) -> np.ndarray:
    out = [rng.integers(-3, -3 + span) for span in _SPANS[:4]]
    out.append(rng.random())
    out += [rng.integers(0, span) for span in _SPANS[4:]]
    out.append(rng.random())
    normals = np.stack([g.normal(0.0, 1.0, size=3) for g in rng.generators()])
    return np.concatenate([np.stack(out, axis=1).astype(np.float64), normals], axis=1)


def test_a_batch_draws_what_each_elements_generator_draws():
    positions = np.arange(0, 500 * 7919, 7919) + 10**9  # scattered, past 2**32 / 4 words
    stream = grain.MapDataset.range(positions.max() + 1).random_map(
        lambda _, rng: _per_element(rng), seed=_SEED
    )
    expected = np.array([stream[int(p)] for p in positions])
    assert np.array_equal(_batched(batch_rng.BatchRng(_SEED, positions)), expected)


def test_generators_take_over_at_each_streams_place():
    """After any number of draws, with a 32-bit half waiting or not, numpy's generator goes on
    where the batch's stream is."""
    positions = np.arange(40)
    stream = grain.MapDataset.range(40)
    for draws in range(7):
        rng = batch_rng.BatchRng(_SEED, positions)
        for k in range(draws):
            rng.integers(0, 7 + k)
        after = np.array([g.integers(0, 1000, size=5) for g in rng.generators()])

        def element(_, g, draws=draws):
            for k in range(draws):
                g.integers(0, 7 + k)
            return g.integers(0, 1000, size=5)

        assert np.array_equal(after, np.stack(list(stream.random_map(element, seed=_SEED))))


def test_empty_range_is_refused():
    with pytest.raises(ValueError, match="ranges of 1 to 2\\*\\*32 values"):
        batch_rng.BatchRng(_SEED, np.arange(3)).integers(5, 5)


def test_the_draws_seed_is_the_one_grain_gives_the_folder_pipelines_random_map():
    """Stated explicitly so both training pipelines share it; it is grain's default there, so
    runs from before it was stated keep their augmentation."""
    for seed in (0, 1, 12345):
        ds = grain.MapDataset.range(50).seed(seed).shuffle().repeat(2)
        draw = lambda _, rng: rng.integers(0, 2**20)
        assert list(ds.random_map(draw)) == list(
            ds.random_map(draw, seed=pipeline._draws_seed(seed))
        )
