"""Task mixing: sampling frequencies of each strategy, determinism, sharding, epochs and exact state restore."""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils.data import DataLoader

from modsquad.data.mixing import MultiTaskMixer, TaskStream, subset, task_probabilities


class IndexDataset(torch.utils.data.Dataset):
    """Row i is the integer i: batches show exactly which rows a stream read."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def make_stream(size: int, batch_size: int, task_index: int = 0, seed: int = 0, **kwargs) -> TaskStream:
    dataset = IndexDataset(size)

    def make_loader(rows, epoch):
        return DataLoader(subset(dataset, rows), batch_size=batch_size, shuffle=False)

    return TaskStream(len(dataset), batch_size, make_loader, seed=seed, task_index=task_index, **kwargs)


def make_mixer(strategy: str, sizes=(400, 100, 25), seed: int = 0, **kwargs) -> MultiTaskMixer:
    streams = {name: make_stream(n, 5, i, seed) for i, (name, n) in enumerate(zip("abc", sizes))}
    return MultiTaskMixer(streams, strategy=strategy, seed=seed, **kwargs)


def test_probabilities_of_each_strategy():
    sizes = [400, 100, 25]
    assert task_probabilities(sizes, "proportional") == pytest.approx([400 / 525, 100 / 525, 25 / 525])
    assert task_probabilities(sizes, "uniform") == pytest.approx([1 / 3] * 3)
    # tau = 2: p ∝ sqrt(n) = 20 : 10 : 5
    assert task_probabilities(sizes, "temperature", temperature=2.0) == pytest.approx(
        [20 / 35, 10 / 35, 5 / 35]
    )
    assert task_probabilities(sizes, "temperature", temperature=1.0) == pytest.approx(
        task_probabilities(sizes, "proportional")
    )
    with pytest.raises(ValueError, match="accepted"):
        task_probabilities(sizes, "round_robin")
    with pytest.raises(ValueError, match="temperature"):
        task_probabilities(sizes, "temperature", temperature=0)


@pytest.mark.parametrize("strategy", ["proportional", "temperature", "uniform"])
def test_sampled_frequencies_follow_the_probabilities(strategy):
    mixer = make_mixer(strategy)
    draws = collections.Counter(t for step in range(3000) for t in mixer.tasks_for_step(step))
    total = sum(draws.values())
    assert total == 3000 * 3  # tasks_per_step defaults to the number of tasks
    observed = [draws[name] / total for name in "abc"]
    assert observed == pytest.approx(mixer.probabilities, abs=0.02)


def test_simt_takes_every_task_every_step():
    mixer = make_mixer("simt")
    for _ in range(7):
        assert [task for task, _ in mixer.next_step()] == ["a", "b", "c"]
    # An epoch is the largest task seen once: 400 rows / batches of 5.
    assert mixer.steps_per_epoch == 80


def test_sampled_epoch_is_one_pass_over_all_batches():
    mixer = make_mixer("proportional", tasks_per_step=2)
    assert mixer.steps_per_epoch == 53  # ceil((80 + 20 + 5) batches / 2 per step)


def test_draws_are_deterministic_for_a_seed_and_differ_across_seeds():
    first = [make_mixer("uniform", seed=3).tasks_for_step(s) for s in range(50)]
    again = [make_mixer("uniform", seed=3).tasks_for_step(s) for s in range(50)]
    other = [make_mixer("uniform", seed=4).tasks_for_step(s) for s in range(50)]
    assert first == again
    assert first != other


def test_stream_reshuffles_each_epoch_and_covers_every_row():
    stream = make_stream(20, 4, seed=1)
    epochs = [torch.cat([next(stream) for _ in range(5)]).tolist() for _ in range(3)]
    for order in epochs:
        assert sorted(order) == list(range(20))
    assert epochs[0] != epochs[1] != epochs[2]
    again = make_stream(20, 4, seed=1)
    assert torch.cat([next(again) for _ in range(5)]).tolist() == epochs[0]


def test_stream_shards_global_batches_across_processes():
    ranks = [make_stream(22, 3, num_replicas=2, rank=r) for r in range(2)]
    assert ranks[0].batches_per_epoch == 3  # 22 rows // (3 x 2): the incomplete global batch is dropped
    seen = [torch.cat([next(s) for _ in range(3)]).tolist() for s in ranks]
    assert not set(seen[0]) & set(seen[1])
    assert len(set(seen[0]) | set(seen[1])) == 18
    with pytest.raises(ValueError, match="global batch"):
        make_stream(5, 3, num_replicas=2)


def test_restored_state_continues_the_same_data_order():
    reference = make_mixer("temperature")
    steps = [reference.next_step() for _ in range(60)]  # crosses epochs of the small tasks
    interrupted = make_mixer("temperature")
    for _ in range(23):
        interrupted.next_step()
    resumed = make_mixer("temperature")
    resumed.load_state_dict(interrupted.state_dict())
    for expected in steps[23:]:
        got = resumed.next_step()
        assert [t for t, _ in got] == [t for t, _ in expected]
        for (_, a), (_, b) in zip(got, expected):
            assert torch.equal(a, b)


def test_restoring_onto_other_data_is_refused():
    state = make_mixer("simt").state_dict()
    with pytest.raises(ValueError, match="samples"):
        make_mixer("simt", sizes=(400, 100, 30)).load_state_dict(state)
    with pytest.raises(ValueError, match="strategy"):
        make_mixer("uniform").load_state_dict(state)


def test_opening_loaders_leaves_the_global_rng_alone():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    stream = make_stream(20, 4)
    for _ in range(12):  # opens three epochs' loaders
        next(stream)
    assert torch.equal(torch.rand(3), expected)
    assert stream.epoch == 2
