"""Render a site's ring plan: a markdown report (shapes, scale, mask, layout, backward scheme and why,
ring order, steps x ranks with mask class and bytes) and a picture of the schedule (matplotlib)."""
from __future__ import annotations

from typing import Optional

from burstc.schedule.cost import (KV_RING, QUERY_RING, AttentionShape, backward_for_plan, forward_bytes,
                                  plan_backward_bytes)
from burstc.schedule.masks import AttentionMask
from burstc.schedule.route import DIRECT
from burstc.schedule.plan import (DIAGONAL, FULL, KV, PARTIAL, SKIPPED, ULYSSES_RING, RingPlan, build_plan,
                                  markdown_table)
from burstc.schedule.topology import ulysses_kv_heads

_COLORS = {FULL: "#4c78a8", DIAGONAL: "#f58518", PARTIAL: "#54a24b", SKIPPED: "#e0e0e0"}


def plan_report(plan: RingPlan, shape: AttentionShape, *, title: str, scale, scheme: str,
                notes: Optional[list[str]] = None, predictions: Optional[dict] = None, full: bool = True) -> str:
    """Markdown: what the site is, how its ring runs, the schedules the cost model compared
    (predictions: burstc.schedule.predict's, by schedule), work and bytes per rank (min / median / max) and,
    when full, the table of steps x ranks and every pair's work items (G^2 lines: leave them out at scale).
    For ulysses_ring, shape is the head-sharded chunk the ring over the nodes carries."""
    row_bytes = shape.batch * 2 * shape.heads_kv * shape.head_dim * shape.itemsize
    fwd = plan.rows_sent(KV) * row_bytes
    bwd = {k: plan_backward_bytes(shape, plan, k) for k in (QUERY_RING, KV_RING)}
    requested, scheme = scheme, backward_for_plan(shape, plan, scheme)
    why = ("auto: the smaller" if requested == "auto" else
           "requested; the smaller" if bwd[scheme] == min(bwd.values()) else "requested explicitly")
    lines = [
        f"# {title}", "",
        f"- q: [B={shape.batch}, H_q={shape.heads_q}, N={plan.seq_len}, d={shape.head_dim}], "
        f"k/v heads H_kv={shape.heads_kv} (GQA group {shape.heads_q // shape.heads_kv}), dtype {shape.dtype}",
        f"- scale: {scale if scale is not None else f'1/sqrt({shape.head_dim}) (default)'}; mask: "
        f"{plan.mask.describe() if plan.mask is not None else 'causal' if plan.causal else 'none'} (global positions)",
        f"- layout: {plan.layout}; {_route_line(plan)}; rows per rank: {plan.local_len} "
        f"(real tokens per {'node' if plan.schedule == ULYSSES_RING else 'rank'}: {_spread(plan.valid_lens)})",
        f"- forward bytes sent, all ranks: {fwd} (K, V: 2*H_kv*d*e per row and hop; a dense ring would send "
        f"{plan.world_size * forward_bytes(shape)})",
        f"- backward scheme: **{scheme}**; bytes, all ranks: query ring {bwd[QUERY_RING]}, KV ring {bwd[KV_RING]} "
        f"({why})",
        f"- skipped (fully masked) pairs: {plan.skipped_pairs()} of {plan.world_size ** 2}",
    ]
    if plan.schedule == ULYSSES_RING:
        lines.append(f"- ulysses_ring: the ring below is one of the rings over the nodes (one per local index, "
                     f"each on H_q={shape.heads_q} query and H_kv={shape.heads_kv} K/V heads: the shape above); "
                     f"its bytes are that ring's, and the all-to-alls inside the nodes are in the schedules table")
    lines += [f"- {n}" for n in notes or []]
    if predictions:
        lines += ["", "## Schedules (predicted by the cost model, one call forward + backward, per rank)", "",
                  schedule_table(predictions, plan.schedule)]
    lines += ["", f"## Per rank ({plan.steps} forward steps)", "", per_rank_table(plan, row_bytes)]
    if not full:
        return "\n".join(lines + ["", "(the steps x ranks table and every pair's work items: --full)"]) + "\n"
    lines += ["", "## Forward steps (KV ring): key chunk each rank's queries meet, mask class", "",
              plan.table(bytes_per_row=row_bytes), "",
              "## Work items per pair (rows are local, padded indices)", ""]
    for q_rank in range(plan.world_size):
        for k_rank in range(plan.world_size):
            pair = plan.pair(q_rank, k_rank)
            items = ", ".join(f"q[{i.q_start}:{i.q_stop}] x k[{i.k_start}:{i.k_stop}] "
                              f"{'causal' if i.causal else 'masked' if i.masked else 'full'}"
                              for i in pair.items) or "-"
            lines.append(f"- q{q_rank} x k{k_rank}: {pair.mask}, {pair.visible_pairs} visible pairs: {items}")
    return "\n".join(lines) + "\n"


def schedule_table(predictions: dict, chosen: str) -> str:
    """Markdown: each schedule's predicted time, exposed communication and bytes per link class."""
    head = ["schedule", "total ms", "forward ms", "backward ms", "exposed comm ms", "intra MiB (all ranks)",
            "inter MiB (all ranks)"]
    rows = []
    for name, p in predictions.items():
        label = f"**{name}** (chosen)" if name == chosen else name
        if p.reason is not None:
            rows.append([label, f"cannot run: {p.reason}", "", "", "", "", ""])
            continue
        rows.append([label] + [f"{float(t) * 1e3:.3g}" for t in (p.total_s, p.forward_s, p.backward_s, p.exposed_comm_s)]
                    + [f"{float(p.bytes_by_link[c]) / 2**20:.3g}" for c in ("intra", "inter")])
    return markdown_table(head, rows)


def per_rank_table(plan: RingPlan, row_bytes: int) -> str:
    """Markdown: min / median / max over the ranks of the (query, key) pairs each computes, the K/V bytes
    each sends in the forward ring and its fully masked pairs."""
    work = [sum(p.visible_pairs for p in plan.pairs[r]) for r in range(plan.world_size)]
    sent = [0] * plan.world_size
    for src, _, rows in plan.messages(KV):
        sent[src] += rows * row_bytes
    skipped = [plan.skipped_pairs(r) for r in range(plan.world_size)]
    rows = [[what, *_min_median_max(values)] for what, values in (
        ("visible (query, key) pairs computed", work), ("forward K/V bytes sent", sent),
        ("fully masked pairs skipped", skipped))]
    return markdown_table(["per rank", "min", "median", "max"], rows)


def _min_median_max(values) -> list[str]:
    ordered = sorted(values)
    return [str(ordered[0]), str(ordered[len(ordered) // 2]), str(ordered[-1])]


def _spread(values) -> str:
    """A short list as it is, a long one as min / median / max."""
    if len(values) <= 8:
        return str(list(values))
    low, mid, high = _min_median_max(values)
    return f"{low} on every rank" if low == high else f"min {low}, median {mid}, max {high}"


def _route_line(plan: RingPlan) -> str:
    if plan.order is not None and plan.schedule != ULYSSES_RING:
        order = list(plan.order + plan.order[:1] if plan.world_size > 1 else plan.order)
        if len(order) > 17:
            order = [*order[:8], "...", *order[-3:]]
        direct = ", route: direct (each chunk from its owner straight to the ranks that read it)" \
            if plan.route.name == DIRECT else ""
        return f"schedule: {plan.schedule}, ring order: {' -> '.join(map(str, order))}{direct}"
    return plan.describe_route().replace("=", ": ", 1)


def site_ring(plan, world_size: int, seq_len: int, batch: int) -> tuple[RingPlan, AttentionShape]:
    """The ring plan a converted site (a passes.plan.SitePlan) runs at seq_len on world_size ranks,
    with the schedule the cost model picked, and the per-rank shape of what its ring carries. A window the
    graph states as constants is in the plan; masks made of run-time data (padding, documents) are not."""
    site = plan.site
    q, k = site.tensor("query"), site.tensor("key")
    schedule = plan.predicted or "ring"
    window = (site.window_left, site.window_right)
    mask = AttentionMask(causal=bool(plan.causal), window=window) if window != (None, None) else None
    ring = build_plan(world_size, plan.layout, seq_len, bool(plan.causal), mask=mask, schedule=schedule,
                      node_size=plan.node_size or world_size)
    heads_q, heads_kv = int(q.shape[1]), int(k.shape[1])
    if schedule == ULYSSES_RING:
        n = plan.node_size
        heads_q, heads_kv = heads_q // n, ulysses_kv_heads(heads_q, heads_kv, n)
    shape = AttentionShape(batch=batch, heads_q=heads_q, heads_kv=heads_kv, head_dim=int(q.shape[3]),
                           local_rows=ring.local_len, world_size=ring.world_size, dtype=q.dtype)
    return ring, shape


def plan_picture(plan: RingPlan, path: str, title: str = "") -> Optional[str]:
    """Ranks x steps: a box per (rank, step) coloured by mask class, annotated with the key chunk and
    the share of compute; arrows for the K/V transfers (to the step that needs them). Returns the path, or None when
    matplotlib is missing (pip install burstc[debug])."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return None
    g = plan.world_size
    most = max((plan.pair(r, k).visible_pairs for r in range(g) for k in range(g)), default=1) or 1
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * plan.steps, 0.9 + 0.7 * g))
    for step in range(plan.steps):
        for rank in range(g):
            pair = plan.kv_visit(step, rank)
            ax.add_patch(plt.Rectangle((step, rank), 0.8, 0.7, color=_COLORS[pair.mask]))
            share = pair.visible_pairs / most
            ax.text(step + 0.4, rank + 0.35, f"k{pair.k_rank}\n{share:.0%}", ha="center", va="center", fontsize=8)
            for dst, dst_step in plan.deliveries(KV, step, rank):
                ax.annotate("", xy=(dst_step, dst + 0.35), xytext=(step + 0.8, rank + 0.35),
                            arrowprops=dict(arrowstyle="->", color="#888888", lw=0.8))
    ax.set_xlim(-0.2, plan.steps)
    ax.set_ylim(g, -0.3)
    ax.set_xticks([s + 0.4 for s in range(plan.steps)], [f"step {s}" for s in range(plan.steps)])
    ax.set_yticks([r + 0.35 for r in range(g)], [f"rank {r}" for r in range(g)])
    ax.set_title(title or f"{plan.layout} ring, G={g}, N={plan.seq_len}, causal={plan.causal}", fontsize=9)
    ax.legend(handles=[Patch(color=c, label=m) for m, c in _COLORS.items()], loc="upper left",
              bbox_to_anchor=(1.0, 1.0), fontsize=8, title="compute (% of largest pair)", title_fontsize=7)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
