"""Contract: bytes per link class and predicted time of one attention call under each ring schedule.

Three schedules run one exact attention call over G = P * n ranks (P nodes of n consecutive ranks):

  ring          a flat ring 0 -> 1 -> ... -> G-1 -> 0; G - 1 hops per rank, P of its edges cross nodes
  double_ring   an inner ring inside each node and an outer ring across nodes: per rank P * (n - 1)
                intra-node hops and P - 1 inter-node hops; the next outer chunk's inter-node hop is
                posted at the start of an inner cycle and overlaps the whole cycle
  ulysses_ring  an all-to-all inside each node turns sequence shards into head shards (H / n query
                heads and ulysses_kv_heads(H, Hk, n) K/V heads for all n * L rows of the node), a ring
                of P steps across the nodes on node-sized chunks, and an all-to-all back

`_link_totals` holds the exact byte counts, summed over all ranks, per link class (dense, no mask);
the runtime's byte counters are compared with these. Every per-rank, per-step quantity of the time
model is derived from them (divided by G and by the number of hops), so they are the single source.

Time model, per rank (sympy, so the padded local rows L may be symbolic):
  flops         forward 4 * B * H * N^2 * d with N = G * L (half when causal); backward 2.5x forward;
                spread evenly over the ranks and the schedule's steps (ring, double_ring: G steps;
                ulysses_ring: P steps of n^2-times bigger blocks with H / n heads: the same total),
                at `flops_per_s` (DEFAULT_FLOPS).
  a hop         bytes / bandwidth + latency of its link class (topology.links).
  ring          c + (G - 1) * max(c, hop): each step overlaps the next hop with compute c; when the
                ring spans several nodes every step waits for the inter-node hop (a flat ring moves
                in lock step, so the slowest edge sets the pace).
  double_ring   inner cycle = c + (n - 1) * max(c, intra hop); the P - 1 inter-node hops each overlap
                a whole inner cycle: (P - 1) * max(inner cycle, inter hop) + inner cycle.
  ulysses_ring  all-to-all in + c + (P - 1) * max(c, inter hop) + all-to-all back; an all-to-all is not
                overlapped: bytes per rank / intra bandwidth + (n - 1) * intra latency.
  The backward uses the same forms with the scheme's payload + accumulator bytes per hop.
  exposed_comm_s is total_s minus the compute time: communication not hidden by compute.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Union

import sympy

from burstc.schedule.cost import KV_RING, AttentionShape, Size, backward_row_bytes, choose_backward
from burstc.schedule.plan import SCHEDULE_CHOICES, SCHEDULES, ULYSSES_RING
from burstc.schedule.route import DOUBLE_RING, RING
from burstc.schedule.topology import INTER, INTRA, Topology, ulysses_kv_heads

PHASES = ("forward", "backward")
REFERENCE = "flat ring (PyTorch CP / ring-flash-attn)"

# Dense bf16 attention kernel throughput of one H100 SXM: FlashAttention-3 (Shah et al. 2024) reports
# up to ~740 TFLOP/s forward in 16-bit at long sequences; 700e12 is the round figure used for both passes.
DEFAULT_FLOPS = 700e12
BACKWARD_FLOPS_RATIO = 2.5

Time = Union[float, sympy.Expr]


@dataclass(frozen=True)
class Prediction:
    """One schedule's predicted cost of one attention call (forward + backward), per rank.

    reason is None when the schedule is usable, else why not (then every number is None).
    bytes_by_link: forward + backward bytes summed over all ranks, keys "intra" and "inter".
    Times in seconds: floats for concrete shapes, sympy expressions when L is symbolic."""

    schedule: str
    reason: Optional[str]
    steps: Optional[int]
    bytes_by_link: Optional[dict]
    forward_s: Optional[Time]
    backward_s: Optional[Time]
    total_s: Optional[Time]
    exposed_comm_s: Optional[Time]


def _check_schedule(schedule: str) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")


def _check_fits(shape: AttentionShape, topology: Topology) -> None:
    if shape.world_size != topology.world_size:
        raise ValueError(f"the shape is for {shape.world_size} ranks but the topology has {topology.world_size}")


def feasibility(shape: AttentionShape, topology: Topology, schedule: str) -> Optional[str]:
    """None when `schedule` can run this shape on this topology, else the reason in words."""
    _check_schedule(schedule)
    _check_fits(shape, topology)
    if schedule != ULYSSES_RING:
        return None
    n, hq, hkv = topology.node_size, shape.heads_q, shape.heads_kv
    if hq % n:
        return f"{hq} query heads do not split over nodes of {n} ranks"
    if ulysses_kv_heads(hq, hkv, n) is None:
        return (f"{hkv} K/V heads do not split over nodes of {n} ranks (the node size must divide "
                f"them or they the node size)")
    return None


def _ulysses_shape(shape: AttentionShape, topology: Topology) -> AttentionShape:
    """The head-sharded chunk the ring over nodes carries: H / n and c heads, n * L rows, P ranks."""
    n = topology.node_size
    return dataclasses.replace(shape, heads_q=shape.heads_q // n,
                               heads_kv=ulysses_kv_heads(shape.heads_q, shape.heads_kv, n),
                               local_rows=n * shape.local_rows, world_size=topology.nodes)


def _resolve_scheme(shape: AttentionShape, topology: Topology, schedule: str, scheme: str) -> str:
    """The backward scheme; 'auto' picks the cheaper one for the chunk the ring carries."""
    if scheme != "auto":
        backward_row_bytes(shape, scheme)  # validates the name
        return scheme
    return choose_backward(_ulysses_shape(shape, topology) if schedule == ULYSSES_RING else shape)


def _link_totals(shape: AttentionShape, topology: Topology, schedule: str, phase: str,
                 scheme: str) -> dict[str, Size]:
    """The exact bytes over all ranks, split into the parts the time model needs.

    ring / double_ring: {"intra", "inter"} of the ring hops. ulysses_ring: {"a2a_in", "inter",
    "a2a_out"}, the two all-to-alls being intra-node traffic."""
    G, n, P = topology.world_size, topology.node_size, topology.nodes
    B, L, d, e, a = shape.batch, shape.local_rows, shape.head_dim, shape.itemsize, shape.acc_itemsize
    if schedule in (RING, DOUBLE_RING):
        if phase == "forward":
            hop = L * B * 2 * shape.heads_kv * d * e
        else:
            hop = L * B * sum(backward_row_bytes(shape, scheme))
        if schedule == RING:
            crossing = P if P > 1 else 0  # ring edges that cross nodes
            return {INTRA: (G - crossing) * (G - 1) * hop, INTER: crossing * (G - 1) * hop}
        return {INTRA: G * P * (n - 1) * hop, INTER: G * (P - 1) * hop}
    h = shape.heads_q // n
    c = ulysses_kv_heads(shape.heads_q, shape.heads_kv, n)
    rows = G * (n - 1) * L * B  # rows each all-to-all moves, summed over the ranks
    if phase == "forward":
        a2a_in = rows * d * e * (h + 2 * c)  # q, k, v
        a2a_out = rows * h * (d * e + a)  # out, and lse in acc dtype
        hop = n * L * B * 2 * c * d * e
    else:
        a2a_in = rows * (d * e * (h + 2 * c + h) + 2 * a * h)  # q, k, v, dout; lse and D = rowsum(dO O) in acc dtype
        a2a_out = rows * d * a * (h + 2 * c)  # dq, dk, dv in acc dtype
        hop = n * L * B * sum(backward_row_bytes(_ulysses_shape(shape, topology), scheme))
    return {"a2a_in": a2a_in, INTER: G * (P - 1) * hop, "a2a_out": a2a_out}


def bytes_by_link(shape: AttentionShape, topology: Topology, schedule: str, phase: str,
                  scheme: str = KV_RING) -> dict[str, Size]:
    """Bytes of one attention call's `phase` summed over all ranks, per link class ("intra",
    "inter"); dense (no mask). Raises ValueError for an unknown schedule, phase or scheme, and for a
    schedule this shape cannot use (feasibility's reason)."""
    _check_schedule(schedule)
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}: choose one of {', '.join(PHASES)}")
    reason = feasibility(shape, topology, schedule)
    if reason is not None:
        raise ValueError(f"schedule {schedule!r} cannot run: {reason}")
    scheme = _resolve_scheme(shape, topology, schedule, scheme)
    t = _link_totals(shape, topology, schedule, phase, scheme)
    if schedule == ULYSSES_RING:
        return {INTRA: t["a2a_in"] + t["a2a_out"], INTER: t[INTER]}
    return t


def _flops(shape: AttentionShape, causal: bool) -> Size:
    """Forward flops of the whole call (all ranks): 4 * B * H * N^2 * d, half when causal."""
    n_tokens = shape.world_size * shape.local_rows
    f = 4 * shape.batch * shape.heads_q * n_tokens ** 2 * shape.head_dim
    return sympy.Rational(1, 2) * f if causal else f


def _hop_time(topology: Topology, link: str, total: Size, hops: int) -> Time:
    """One hop of one rank: its bytes (total over G ranks and `hops` hops each) / bandwidth + latency."""
    if hops == 0:
        return 0
    spec = topology.links[link]
    return sympy.sympify(total) / (topology.world_size * hops) / spec.bandwidth + spec.latency


def _a2a_time(topology: Topology, total: Size) -> Time:
    """One all-to-all inside a node, not overlapped: bytes per rank / bandwidth + (n - 1) latencies."""
    n = topology.node_size
    if n == 1:
        return 0
    spec = topology.links[INTRA]
    return sympy.sympify(total) / topology.world_size / spec.bandwidth + (n - 1) * spec.latency


def _phase_time(shape: AttentionShape, topology: Topology, schedule: str, phase: str, scheme: str,
                flops: Size, flops_per_s: float) -> Time:
    """Seconds one rank spends in `phase` (flops: that phase's flops of the whole call)."""
    G, n, P = topology.world_size, topology.node_size, topology.nodes
    t = _link_totals(shape, topology, schedule, phase, scheme)
    if schedule == RING:
        c = sympy.sympify(flops) / flops_per_s / G / G
        link = INTER if P > 1 else INTRA
        hop = _hop_time(topology, link, t[INTRA] + t[INTER], G - 1)  # every hop waits for the slowest
        return c + (G - 1) * sympy.Max(c, hop)
    if schedule == DOUBLE_RING:
        c = sympy.sympify(flops) / flops_per_s / G / G
        inner = c + (n - 1) * sympy.Max(c, _hop_time(topology, INTRA, t[INTRA], P * (n - 1)))
        return (P - 1) * sympy.Max(inner, _hop_time(topology, INTER, t[INTER], P - 1)) + inner
    c = sympy.sympify(flops) / flops_per_s / G / P
    ring = c + (P - 1) * sympy.Max(c, _hop_time(topology, INTER, t[INTER], P - 1))
    return _a2a_time(topology, t["a2a_in"]) + ring + _a2a_time(topology, t["a2a_out"])


def _value(x):
    """A float (or int for bytes) when x is a number, else the sympy expression."""
    x = sympy.sympify(x)
    if x.free_symbols:
        return x
    return int(x) if x.is_Integer else float(x)


def predict(shape: AttentionShape, topology: Topology, schedule: str, *, causal: bool, scheme: str,
            flops_per_s: float = DEFAULT_FLOPS) -> Prediction:
    """The predicted forward + backward cost of `schedule` (see the module docstring for the model).
    scheme is the backward scheme (query_ring, kv_ring, or 'auto': the cheaper one for the chunk the
    ring carries). An infeasible schedule gives a Prediction with its reason and no numbers."""
    reason = feasibility(shape, topology, schedule)
    if reason is not None:
        return Prediction(schedule, reason, None, None, None, None, None, None)
    scheme = _resolve_scheme(shape, topology, schedule, scheme)
    fwd_flops = _flops(shape, causal)
    bwd_flops = BACKWARD_FLOPS_RATIO * fwd_flops
    fwd = _phase_time(shape, topology, schedule, "forward", scheme, fwd_flops, flops_per_s)
    bwd = _phase_time(shape, topology, schedule, "backward", scheme, bwd_flops, flops_per_s)
    compute = (fwd_flops + bwd_flops) / flops_per_s / topology.world_size
    by_phase = [bytes_by_link(shape, topology, schedule, p, scheme) for p in PHASES]
    total_bytes = {k: _value(by_phase[0][k] + by_phase[1][k]) for k in (INTRA, INTER)}
    steps = topology.nodes if schedule == ULYSSES_RING else topology.world_size
    exposed = _value(fwd + bwd - compute)
    if not isinstance(exposed, sympy.Expr):
        exposed = max(0.0, exposed)  # total >= compute by construction; only float rounding goes below
    return Prediction(schedule, None, steps, total_bytes, _value(fwd), _value(bwd), _value(fwd + bwd), exposed)


def predict_all(shape: AttentionShape, topology: Topology, *, causal: bool, scheme: str,
                flops_per_s: float = DEFAULT_FLOPS) -> dict[str, Prediction]:
    """predict for every schedule, in SCHEDULES order."""
    return {s: predict(shape, topology, s, causal=causal, scheme=scheme, flops_per_s=flops_per_s)
            for s in SCHEDULES}


def predict_reference(shape: AttentionShape, topology: Topology, *, causal: bool,
                      flops_per_s: float = DEFAULT_FLOPS) -> Prediction:
    """The baseline: a flat ring with the KV-ring backward, what PyTorch's context parallel and
    ring-flash-attn run whatever the topology."""
    p = predict(shape, topology, RING, causal=causal, scheme=KV_RING, flops_per_s=flops_per_s)
    return dataclasses.replace(p, schedule=REFERENCE)


def choose_schedule(shape: AttentionShape, topology: Topology, requested: str = "auto", *, causal: bool,
                    scheme: str, flops_per_s: float = DEFAULT_FLOPS,
                    per_head_mask: bool = False) -> tuple[str, dict[str, Prediction]]:
    """(schedule, predictions): the requested schedule if it can run, else ValueError with the reason;
    for 'auto' the feasible schedule with the least predicted total time (ties: ring, double_ring,
    ulysses_ring), and on one node the flat ring without predictions (no link to choose for).
    per_head_mask: the call's mask has per-head parts (a mask_mod, a materialised mask), which
    Ulysses cannot split. Needs concrete sizes: a symbolic batch or L raises TypeError."""
    if requested not in SCHEDULE_CHOICES:
        raise ValueError(f"unknown schedule {requested!r}: choose one of {', '.join(SCHEDULE_CHOICES)}")
    if requested == "auto" and topology.nodes == 1:
        return RING, {}
    if any(sympy.sympify(x).free_symbols for x in (shape.batch, shape.local_rows)):
        raise TypeError("choose_schedule needs concrete sizes (the batch and local rows are symbolic); "
                        "substitute numbers first, or use predict_all for symbolic predictions")
    preds = predict_all(shape, topology, causal=causal, scheme=scheme, flops_per_s=flops_per_s)
    if per_head_mask and preds[ULYSSES_RING].reason is None:
        preds[ULYSSES_RING] = Prediction(ULYSSES_RING, "the mask has per-head parts (a mask_mod or a materialised "
                                         "attn_mask) and Ulysses splits the heads", None, None, None, None, None, None)
    if requested != "auto":
        reason = preds[requested].reason
        if reason is not None:
            others = ", ".join(s for s in SCHEDULE_CHOICES if s == "auto" or preds[s].reason is None)
            raise ValueError(f"schedule {requested!r} cannot run on {topology.describe()}: {reason}; "
                             f"choose one of {others} instead")
        return requested, preds
    best = None
    for s in SCHEDULES:  # strict < keeps the earlier schedule on ties
        if preds[s].reason is None and (best is None or preds[s].total_s < preds[best].total_s):
            best = s
    return best, preds


def summary(chosen: str, predictions: dict[str, Prediction]) -> str:
    """One line for logs: the chosen schedule and every schedule's predicted time."""
    if not predictions:
        return chosen
    times = ", ".join(f"{name} {float(p.total_s) * 1e3:.3g} ms" if p.reason is None else f"{name} cannot run"
                      for name, p in predictions.items())
    return f"{chosen} (predicted per call: {times})"


__all__ = [
    "DEFAULT_FLOPS", "DOUBLE_RING", "Prediction", "REFERENCE", "RING", "SCHEDULES",
    "SCHEDULE_CHOICES", "ULYSSES_RING", "bytes_by_link", "choose_schedule", "feasibility", "predict",
    "predict_all", "predict_reference", "summary",
]
