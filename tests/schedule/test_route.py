"""Routes (flat ring, double ring, direct) and the plans built on them for every schedule: every rank meets
every chunk once, chunks cross the inter-node link as often as the schedule promises, plans are
exact (dense and masked, brute force), their row counts give the predicted bytes per link, the
backward's partial sums travel in chains that end at the chunk's owner, and a window under zigzag
sends each neighbour its halo straight from the owner."""
import itertools
from collections import Counter
from dataclasses import replace

import pytest
import torch

from burstc.schedule import predict
from burstc.schedule.cost import AttentionShape
from burstc.schedule.layout import LAYOUTS, shard_positions
from burstc.schedule.masks import AttentionMask, documents_from_cu_seqlens
from burstc.schedule.plan import KV, QUERY, SCHEDULES, SKIPPED, build_plan
from burstc.schedule.route import Route, direct_route, double_ring_route, flat_route
from burstc.schedule.topology import INTER, INTRA, Topology
from tests.runtime.reference import dense_mask

# (ranks, ranks per node): one node per rank, one node, and several nodes of several ranks
DOUBLE_RING_CASES = [(4, 1), (4, 4), (4, 2), (6, 3), (6, 2), (8, 2), (8, 4), (1, 1)]


def _ids(cases):
    return [f"G{g}n{n}" for g, n in cases]


def _every_delivery(route):
    """(step, rank, chunk, src, src_step) of every chunk a rank receives (steps >= 1)."""
    for s in range(1, route.world_size):
        for r in range(route.world_size):
            src, src_step = route.source[s][r]
            yield s, r, route.held[s][r], src, src_step


@pytest.mark.parametrize("world_size,node_size", DOUBLE_RING_CASES, ids=_ids(DOUBLE_RING_CASES))
def test_double_ring_route_meets_every_chunk_once_crossing_nodes_once_per_cycle(world_size, node_size):
    route = double_ring_route(world_size, node_size)
    topo = Topology(world_size, node_size)
    g, n, nodes = world_size, node_size, world_size // node_size
    assert len(route.held) == g and route.world_size == g
    for r in range(g):
        assert route.held[0][r] == r, "every rank starts with its own chunk"
        assert sorted(route.held[s][r] for s in range(g)) == list(range(g)), f"rank {r} misses or repeats a chunk"

    inter, intra = Counter(), Counter()
    for s, r, chunk, src, src_step in _every_delivery(route):
        assert 0 <= src_step < s and route.held[src_step][src] == chunk, "sender does not hold the chunk then"
        if topo.link(src, r) == INTER:
            inter[chunk] += 1
            # posted at the start of an inner cycle, needed n steps later: overlaps a whole cycle
            assert s - src_step == n, (s, r, src, src_step)
            assert s % n == 0 and topo.local_index(src) == topo.local_index(r)
            assert topo.node_of(r) == (topo.node_of(src) + 1) % nodes, "the outer ring goes to the next node"
        else:
            intra[chunk] += 1
            assert s - src_step == 1 and s % n != 0, "the inner ring moves one step at a time"
            assert topo.local_index(r) == (topo.local_index(src) + 1) % n
    for chunk in range(g):
        assert inter[chunk] == nodes - 1, (chunk, inter)
        assert intra[chunk] == nodes * (n - 1), (chunk, intra)

    # within an outer cycle a node's ranks hold chunks of one node only (they circulate on the inner ring)
    for cycle, p in itertools.product(range(nodes), range(nodes)):
        origins = {topo.node_of(route.held[s][topo.rank_at(p, j)])
                   for s in range(cycle * n, (cycle + 1) * n) for j in range(n)}
        assert len(origins) == 1, (cycle, p, origins)

    # the derived send table is the inverse of the source table
    sends = sorted((src, src_step, r, s) for s, r, _, src, src_step in _every_delivery(route))
    table = sorted((src, step, dst, dst_step) for step in range(g) for src in range(g)
                   for dst, dst_step in route.deliveries(step, src))
    assert sends == table


@pytest.mark.parametrize("order", [(0,), (0, 1), (0, 1, 2, 3), (2, 0, 3, 1), (4, 2, 0, 1, 3)])
def test_flat_route_is_the_plain_ring(order):
    """Simulate the old ring: every step each rank passes what it holds to its successor in `order`."""
    g = len(order)
    route = flat_route(order)
    succ = {order[i]: order[(i + 1) % g] for i in range(g)}
    pred = {b: a for a, b in succ.items()}
    holding = {r: r for r in range(g)}
    for s in range(g):
        assert tuple(holding[r] for r in range(g)) == route.held[s]
        for r in range(g):
            if s:
                assert route.source[s][r] == (pred[r], s - 1)
            want = [(succ[r], s + 1)] if s < g - 1 else []
            assert list(route.deliveries(s, r)) == want
        holding = {succ[r]: c for r, c in holding.items()}
    assert route.order == tuple(order)


@pytest.mark.parametrize("order", [(0, 1, 2), (0, 1, 2, 3), (2, 0, 3, 1)])
def test_direct_route_holds_as_the_ring_and_sends_everything_from_the_owner(order):
    route, ring = direct_route(order), flat_route(order)
    assert route.held == ring.held and route.order == tuple(order)
    g = len(order)
    for s, r, chunk, src, src_step in _every_delivery(route):
        assert (src, src_step) == (chunk, 0)
    for r in range(g):
        assert sorted(route.deliveries(0, r)) == sorted((dst, s) for s in range(1, g) for dst in range(g)
                                                        if route.held[s][dst] == r)
        assert all(not route.deliveries(s, r) for s in range(1, g)), "nobody relays"


def _tables(route):
    return [list(row) for row in route.held], [list(row) for row in route.source]


def _remake(held, source):
    return Route("broken", tuple(map(tuple, held)), tuple(map(tuple, source)))


def test_route_check_rejects_broken_routes():
    good = double_ring_route(4, 2)
    good.check()

    held, source = _tables(good)
    bad = next((r, s) for s in range(1, 4) for r in range(4) if good.source[s][r][0] != 3)
    r, s = bad
    src = next(x for x in range(4) if good.held[s - 1][x] != good.held[s][r])
    source[s][r] = (src, s - 1)  # a sender that does not hold the chunk
    with pytest.raises(ValueError, match="does not hold it"):
        _remake(held, source).check()

    held, source = _tables(good)
    source[2][1] = (source[2][1][0], 2)  # a "source" at the same step, not an earlier one
    with pytest.raises(ValueError):
        _remake(held, source).check()

    held, source = _tables(good)
    held[3][0] = held[2][0]  # rank 0 meets one chunk twice and another never
    with pytest.raises(ValueError, match="each once"):
        _remake(held, source).check()

    held, source = _tables(good)
    held[0][0], held[1][0] = held[1][0], held[0][0]  # own chunk not first
    with pytest.raises(ValueError):
        _remake(held, source).check()

    held, source = _tables(good)
    with pytest.raises(ValueError):
        _remake(held[:3], source[:3]).check()  # too few steps


# --- plans over every schedule ---------------------------------------------------------------------

G, NODE = 4, 2


def _visible_cover(pair, q_pos, k_pos, causal):
    """(how many items compute each pair, which pairs are visible) from positions alone."""
    count = torch.zeros(len(q_pos), len(k_pos), dtype=torch.int64)
    for it in pair.items:
        shape = torch.ones(it.q_len, it.k_len, dtype=torch.int64)
        count[it.q_start:it.q_stop, it.k_start:it.k_stop] += shape.tril() if it.causal else shape
    visible = k_pos[None, :] <= q_pos[:, None] if causal else torch.ones_like(count, dtype=torch.bool)
    return count, visible


def _expected_positions(schedule, seq_len, layout, plan_rank):
    if schedule == "ulysses_ring":
        return torch.cat([shard_positions(seq_len, layout, G, r)
                          for r in range(plan_rank * NODE, (plan_rank + 1) * NODE)])
    return shard_positions(seq_len, layout, G, plan_rank)


def _check_transfer_consistency(plan):
    """A chunk a rank holds at step >= 1 was sent to it by the route's source, and nothing else is
    sent; arrivals mirror deliveries."""
    route = plan.route
    g = plan.world_size
    for role in (KV, QUERY):
        for s in range(1, g):
            for r in range(g):
                src, src_step = route.source[s][r]
                delivered = (r, s) in plan.deliveries(role, src_step, src)
                assert delivered == plan.holds(role, s, r), (role, s, r)
                if delivered:
                    assert plan.holds(role, src_step, src), "forwarded by a rank that no longer holds it"
        for step, rank in itertools.product(range(g), range(g)):
            want = sorted((src, ds) for src in range(g) for dst, ds in plan.deliveries(role, step, src) if dst == rank)
            assert sorted(plan.arrivals(role, step, rank)) == want


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_schedule_builds_exact_plans(schedule, layout):
    for causal, seq_len in itertools.product((True, False), (13, 16)):
        plan = build_plan(G, layout, seq_len, causal, schedule=schedule, node_size=NODE)
        plan.check()
        assert plan.schedule == schedule
        if schedule == "ulysses_ring":
            assert plan.world_size == G // NODE and plan.groups == ((0, 1), (2, 3))
            assert plan.route.held == flat_route((0, 1)).held
        else:
            assert plan.world_size == G and plan.groups is None
            want_route = flat_route(tuple(range(G))) if schedule == "ring" else double_ring_route(G, NODE)
            assert plan.route.held == want_route.held and plan.route.source == want_route.source
        every = torch.cat([plan.positions(p) for p in range(plan.world_size)])
        assert sorted(every.tolist()) == list(range(seq_len)), "each token in exactly one chunk"
        for p in range(plan.world_size):
            assert torch.equal(plan.positions(p), _expected_positions(schedule, seq_len, layout, p))
            assert plan.valid_lens[p] == len(plan.positions(p))
        for qr, kr in itertools.product(range(plan.world_size), repeat=2):
            q_pos, k_pos = plan.positions(qr), plan.positions(kr)
            count, visible = _visible_cover(plan.pair(qr, kr), q_pos, k_pos, causal)
            assert torch.equal(count, visible.long()), (schedule, layout, causal, seq_len, qr, kr)
            assert (plan.pair(qr, kr).mask == SKIPPED) == (not bool(visible.any()))
        _check_transfer_consistency(plan)


def test_unknown_schedule_and_missing_node_size_raise():
    with pytest.raises(ValueError, match="ulysses_ring"):
        build_plan(G, "zigzag", 16, True, schedule="tree", node_size=2)
    for schedule in ("double_ring", "ulysses_ring"):
        with pytest.raises(ValueError, match="node_size"):
            build_plan(G, "zigzag", 16, True, schedule=schedule)
    with pytest.raises(ValueError):
        build_plan(G, "zigzag", 16, True, schedule="double_ring", node_size=3)


B, N_MASKED = 2, 37


def _masks():
    g = torch.Generator().manual_seed(3)
    padding = torch.rand(B, N_MASKED, generator=g) > 0.3
    padding[1, :9] = False
    docs = documents_from_cu_seqlens(torch.tensor([0, 4, 21, 22, N_MASKED]), N_MASKED)
    return {
        "window": (AttentionMask(causal=True, window=(5, 0)), dict(causal=True, window=(5, 0))),
        "bidirectional_window": (AttentionMask(window=(3, 6)), dict(window=(3, 6))),
        "documents": (AttentionMask(causal=True, document_ids=docs),
                      dict(causal=True, document_ids=docs.expand(B, -1))),
        "padding": (AttentionMask(causal=False, key_padding=padding), dict(key_padding=padding)),
        "combined": (AttentionMask(causal=True, window=(9, None), key_padding=padding, document_ids=docs),
                     dict(causal=True, window=(9, None), key_padding=padding, document_ids=docs.expand(B, -1))),
    }


@pytest.mark.parametrize("schedule", ["double_ring", "ulysses_ring"])
@pytest.mark.parametrize("name", ["window", "bidirectional_window", "documents", "padding", "combined"])
def test_masked_plans_under_schedules_are_exact(schedule, name):
    mask, dense = _masks()[name]
    full = dense_mask(B, N_MASKED, **dense)
    seen_anywhere = full.any(dim=1).any(dim=0)
    for layout, tile in itertools.product(LAYOUTS, (3, 256)):
        plan = build_plan(G, layout, N_MASKED, mask.causal, mask=mask, tile=tile, schedule=schedule, node_size=NODE)
        plan.check(brute_force=True)
        for qr, kr in itertools.product(range(plan.world_size), repeat=2):
            q_pos, k_pos = plan.positions(qr), plan.positions(kr)
            seen = seen_anywhere[q_pos][:, k_pos]
            pair = plan.pair(qr, kr)
            count, _ = _visible_cover(pair, q_pos, k_pos, causal=False)
            assert bool((count[seen] == 1).all()) and bool((count <= 1).all()), (layout, tile, qr, kr)
            assert (pair.mask == SKIPPED) == (not bool(seen.any()))
        _check_transfer_consistency(plan)


# --- rows per link against the predicted bytes -----------------------------------------------------

BYTES_CASES = [(4, 2, 4, 2), (4, 2, 4, 4), (6, 3, 6, 3), (8, 2, 4, 1), (8, 4, 8, 8)]  # G, n, Hq, Hkv


@pytest.mark.parametrize("world_size,node_size,heads_q,heads_kv", BYTES_CASES,
                         ids=[f"G{c[0]}n{c[1]}h{c[2]}-{c[3]}" for c in BYTES_CASES])
@pytest.mark.parametrize("schedule", SCHEDULES)
def test_plan_rows_per_link_give_the_predicted_bytes(schedule, world_size, node_size, heads_q, heads_kv):
    batch, d, rows_per_rank = 2, 8, 3
    e = a = 4  # float32: element and accumulator bytes
    seq_len = 2 * world_size * rows_per_rank  # no padding under any layout: L = 2 * rows_per_rank
    topo = Topology(world_size, node_size)
    shape = AttentionShape(batch, heads_q, heads_kv, d, seq_len // world_size, world_size, torch.float32)
    plan = build_plan(world_size, "zigzag", seq_len, False, schedule=schedule, node_size=node_size)
    if schedule == "ulysses_ring":
        rings = node_size  # one ring across the nodes per local index, plan ranks are nodes
        link = lambda a_, b_: INTER if a_ != b_ else INTRA  # noqa: E731
        hq = heads_q // node_size
        hkv = heads_kv // node_size if heads_kv % node_size == 0 else 1
    else:
        rings, link, hq, hkv = 1, topo.link, heads_q, heads_kv

    def total(per_row, role, accumulators=False):
        rows = plan.rows_by_link(link, role, accumulators)
        return {c: rings * batch * per_row * rows[c] for c in (INTRA, INTER)}

    fwd = total(2 * hkv * d * e, KV)
    kv = {c: x + y for (c, x), y in zip(total(2 * hkv * d * e, KV).items(),
                                        total(2 * hkv * d * a, KV, True).values())}
    qr = {c: x + y for (c, x), y in zip(total(hq * (2 * d * e + 2 * a), QUERY).items(),
                                        total(hq * d * a, QUERY, True).values())}
    want = {ph_sc: predict.bytes_by_link(shape, topo, schedule, *ph_sc)
            for ph_sc in (("forward", "kv_ring"), ("backward", "kv_ring"), ("backward", "query_ring"))}
    if schedule == "ulysses_ring":
        # the ring's bytes are the inter-node part; the all-to-alls inside the nodes are not plan messages
        assert fwd[INTRA] == kv[INTRA] == qr[INTRA] == 0
        assert fwd[INTER] == want["forward", "kv_ring"][INTER]
        assert kv[INTER] == want["backward", "kv_ring"][INTER]
        assert qr[INTER] == want["backward", "query_ring"][INTER]
    else:
        assert fwd == want["forward", "kv_ring"]
        assert kv == want["backward", "kv_ring"]
        assert qr == want["backward", "query_ring"]
    splits = schedule == "double_ring" or schedule == "ulysses_ring" and heads_kv % node_size == 0
    if node_size < world_size and splits:
        # fewer bytes cross nodes than on the flat ring (ulysses: node-sized chunks of 1/n of the K/V
        # heads; with K/V heads replicated over a node's ranks it may send more)
        ring = build_plan(world_size, "zigzag", seq_len, False, schedule="ring").rows_by_link(topo.link)
        assert fwd[INTER] < batch * 2 * heads_kv * d * e * ring[INTER]


# --- accumulators of the backward ------------------------------------------------------------------

ACC_CASES = [(4, 2), (6, 3), (8, 2), (8, 4), (6, 2)]


def _acc_chains(plan, role):
    """Per chunk: {(step, holder): next} of its partial sums, and the messages that go home."""
    chains = {c: {} for c in range(plan.world_size)}
    for s in range(1, plan.world_size):
        for r in range(plan.world_size):
            if plan.holds(role, s, r):
                chains[plan.held(s, r)][s, r] = plan.accumulator_next(role, s, r)
    return chains


@pytest.mark.parametrize("world_size,node_size", ACC_CASES, ids=_ids(ACC_CASES))
@pytest.mark.parametrize("layout,causal", [("zigzag", False), ("zigzag", True), ("contiguous", True)])
def test_double_ring_accumulators_chain_home(world_size, node_size, layout, causal):
    plan = build_plan(world_size, layout, 5 * world_size + 1, causal, schedule="double_ring", node_size=node_size)
    topo = Topology(world_size, node_size)
    nodes = topo.nodes
    for role in (KV, QUERY):
        chains = _acc_chains(plan, role)
        assert sum(len(c) for c in chains.values()) == sum(1 for _ in plan.messages(role, accumulators=True))
        for chunk, chain in chains.items():
            incoming = Counter()
            for (s, r), nxt in chain.items():
                if nxt == chunk:
                    continue  # home
                # otherwise the next holder, one step later, which adds its own partials and sends on
                assert (s + 1, nxt) in chain, (role, chunk, s, r, nxt)
                assert plan.accumulator_prev(role, s + 1, nxt) == r
                assert topo.link(r, nxt) == INTRA, "partial sums trail the chunk on the inner ring"
                incoming[s + 1, nxt] += 1
            assert max(incoming.values(), default=0) <= 1, "a chain, not a tree"
            for (s, r) in chain:  # following any holder's partials ends at the owner
                cur = (s, r)
                while chain[cur] != chunk:
                    cur = (cur[0] + 1, chain[cur])
                assert cur in chain
                if (s, r) not in incoming:
                    assert s == 1 or s % node_size == 0, "chains start where the chunk arrives"
            home = sorted(plan.accumulators_home(role, chunk))
            assert home == sorted((r, s) for (s, r), nxt in chain.items() if nxt == chunk)
            last = plan.last_step[role][chunk]
            assert len(home) <= nodes
            # one message home per outer cycle the chunk is held in after step 0: cycle 0 (steps
            # 1 .. n-1) when it travels at all, and every cycle c whose first step c*n it reaches
            assert len(home) == (last >= 1) + last // node_size, (role, chunk, last, home)
            if not causal:
                assert len(home) == nodes, (role, chunk, home)
                inter = sum(topo.link(r, chunk) == INTER for r, _ in home)
                assert inter == nodes - 1, "every cycle but the owner's sends its sum home across nodes"


# --- the direct route: a window under zigzag ---------------------------------------------------------

@pytest.mark.parametrize("world_size", [3, 4, 5, 8])
@pytest.mark.parametrize("left", [1, 6])
def test_a_window_under_zigzag_sends_its_halos_straight_to_the_neighbours(world_size, left):
    """Each zigzag segment needs the `left` rows before it; they sit on the ranks holding the neighbouring
    segments, r - 1 and r + 1 (rank G - 1 holds two adjacent segments). The plan sends exactly those rows,
    once each, keys forward and queries for the query ring alike; the relay would carry a chunk round the
    ring."""
    seq_len = 2 * world_size * 8
    mask = AttentionMask(causal=True, window=(left, 0))
    plan = build_plan(world_size, "zigzag", seq_len, True, mask=mask, tile=4)
    plan.check(brute_force=True)
    assert plan.route.name == "direct" and "route=direct" in plan.table()
    _check_transfer_consistency(plan)
    boundaries = 2 * world_size - 2  # segment boundaries between different ranks
    for role in (KV, QUERY):
        assert plan.rows_sent(role) == boundaries * left, role
        assert plan.rows_sent(role, accumulators=True) == boundaries * left, role
        assert all(abs(src - dst) == 1 for src, dst, _ in plan.messages(role)), "neighbours only"
        for src, dst, rows in plan.messages(role):
            assert rows == left
    relayed = replace(plan, route=flat_route(plan.route.order))
    relayed.check(brute_force=True)
    assert relayed.rows_sent(KV) > plan.rows_sent(KV)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_direct_route_only_where_it_sends_less_and_holds_at_most_two_shards(layout):
    """A plan never takes the direct route unless it sends fewer rows than the relay, with at most two
    shards' rows received per rank (all posted at step 0); causal and full attention keep the ring."""
    direct = 0
    for world_size, causal, left in itertools.product((3, 4, 6), (True, False), (None, 2, 9, 40)):
        seq_len = 12 * world_size
        mask = AttentionMask(causal=causal, window=None if left is None else (left, left // 2))
        plan = build_plan(world_size, layout, seq_len, causal, mask=mask, tile=4)
        relayed = replace(plan, route=flat_route(plan.route.order))
        if plan.route.name != "direct":
            continue
        direct += 1
        sent = lambda p: sum(p.rows_sent(role, accumulators=acc) for role in (KV, QUERY) for acc in (False, True))  # noqa: E731
        assert sent(plan) < sent(relayed), (world_size, layout, causal, left)
        for role in (KV, QUERY):
            received = Counter()
            for _, dst, rows in plan.messages(role):
                received[dst] += rows
            assert max(received.values()) <= 2 * plan.local_len
    assert direct, "some of these windows take the direct route"
    for causal in (True, False):
        assert build_plan(4, layout, 48, causal).route.name == "ring"
