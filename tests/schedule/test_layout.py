import torch
from hypothesis import given, settings, strategies as st

from burstc.schedule import layout as layouts


@settings(max_examples=150, deadline=None)
@given(seq_len=st.integers(1, 300), world_size=st.integers(1, 8), layout=st.sampled_from(layouts.LAYOUTS))
def test_shards_partition_the_sequence(seq_len, world_size, layout):
    shards = [layouts.shard_positions(seq_len, layout, world_size, r) for r in range(world_size)]
    every = torch.cat(shards).sort().values
    assert torch.equal(every, torch.arange(seq_len)), "each token belongs to exactly one rank"
    rows = layouts.local_padded_length(seq_len, layout, world_size)
    for r, pos in enumerate(shards):
        assert len(pos) == layouts.local_length(seq_len, layout, world_size, r) <= rows
        assert bool((pos[1:] > pos[:-1]).all()), "positions increase with the local index"
        blocks = layouts.rank_blocks(seq_len, layout, world_size, r)
        assert sum(b.length for b in blocks) == rows
        # real tokens are a prefix of the padded shard: no valid row after a padding row
        valid = torch.cat([torch.arange(b.length) < b.valid for b in blocks])
        assert not bool((valid[1:] & ~valid[:-1]).any())


def test_zigzag_and_striped_positions():
    assert layouts.shard_positions(16, "zigzag", 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert layouts.shard_positions(16, "zigzag", 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert layouts.shard_positions(10, "striped", 3, 1).tolist() == [1, 4, 7]
    assert layouts.shard_positions(10, "contiguous", 3, 2).tolist() == [8, 9]
    # uneven zigzag: the padding falls at the end of the sequence, so rank 0's tail chunk is short
    assert layouts.shard_positions(13, "zigzag", 2, 0).tolist() == [0, 1, 2, 3, 12]


def test_unknown_layout_names_the_choices():
    try:
        layouts.chunk_count("diagonal", 2)
    except ValueError as e:
        assert "contiguous, zigzag, striped" in str(e)
    else:
        raise AssertionError("unknown layout accepted")
