"""rewrite: every site whose plan converts becomes a `burst::attention` call (output 0 of the op
replaces the SDPA node); the other sites stay SDPA and their reason is logged once per site."""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch.fx.experimental.symbolic_shapes import statically_known_true

import burstc.runtime.op  # noqa: F401  (registers torch.ops.burst)
from burstc.config import BurstConfig
from burstc.passes.find_attention import rebind
from burstc.passes.higher_order import attention_in_bodies, describe, graphs
from burstc.passes.plan import SitePlan
from burstc.runtime.sinks import apply_sinks, sink_site_mask
from burstc.schedule import predict

log = logging.getLogger("burstc.passes")
_logged: set[tuple[str, str]] = set()


def rewrite_sites(gm: fx.GraphModule, plans: list[SitePlan], cfg: BurstConfig, group_name: str,
                  graph_id: str = "", local: bool = False) -> fx.GraphModule:
    """local: the graph is sequence-sharded (the shard pass ran), so sites take and return this rank's
    shards (`burst::attention_local`); otherwise they take the full sequence (`burst::attention`)."""
    op = torch.ops.burst.attention_local.default if local else torch.ops.burst.attention.default
    for plan in plans:
        site = plan.site
        if not plan.converts:
            counters["burst"]["sites_left"] += 1
            key = (site.source or site.name, plan.reason)
            if key not in _logged:
                _logged.add(key)
                log.warning("burst: attention %s left as plain SDPA: %s%s", site.name, plan.reason,
                            f" (at {site.source})" if site.source else "")
            continue
        rebind(site)  # an earlier rewrite may have replaced this site's inputs (one attention feeding another)
        assert not (site.mask_buffers and site.proof_buffers), "a FlexAttention mask_mod is never proven"
        graph = gm.graph
        with graph.inserting_before(site.node):
            verify_site = f"{graph_id}/{site.name}" if cfg.verify else ""
            every_call = cfg.verify or cfg.checks == "always"
            site_key = "" if every_call else f"{graph_id}/{site.name}/{plan.seq_len}"
            query, key, value = _broadcast(graph, site)
            attn_mask = site.attn_mask
            if site.sinks is not None and attn_mask is not None:
                attn_mask = graph.call_function(sink_site_mask, (attn_mask,))
            call = graph.call_function(op, (
                query, key, value, attn_mask, site.key_padding, site.document_ids,
                list(site.mask_buffers or site.proof_buffers), plan.causal, site.window_left, site.window_right,
                site.mask_mod, site.proof, plan.scale, site.softcap, plan.enable_gqa, plan.layout,
                plan.backward, cfg.kernel, plan.schedule, cfg.node_size or 0, group_name, site_key, verify_site))
            out = graph.call_function(operator.getitem, (call, 0))
            if site.sinks is not None:  # folded in once, from the global log-sum-exp
                lse = graph.call_function(operator.getitem, (call, 1))
                out = graph.call_function(apply_sinks, (out, lse, site.sinks))
        out.meta.update(site.node.meta)
        site.node.replace_all_uses_with(out)
        graph.erase_node(site.node)
        counters["burst"]["sites_converted"] += 1
        if plan.schedule_note:
            log.warning("burst: attention %s: %s", site.name, plan.schedule_note)
        log.info("burst: attention %s -> %s (layout %s, backward %s, schedule %s)%s", site.name, op,
                 plan.layout, plan.backward, predict.summary(plan.predicted or "ring", plan.predictions), f" at {site.source}" if site.source else "")
    gm.graph.lint()
    gm.recompile()
    return gm


def _broadcast(graph: fx.Graph, site) -> tuple[fx.Node, fx.Node, fx.Node]:
    """q, k, v with SDPA's broadcasting made explicit where the ring needs equal sizes: a batch of 1
    expanded to the others' batch, one query head to the key/value heads (views, nothing copied here;
    one key/value head is grouped-query attention and stays as it is)."""
    q, k, v = (site.tensor(n) for n in ("query", "key", "value"))
    nodes = [site.query, site.key, site.value]
    batches = [t.shape[0] for t in (q, k, v)]
    widest = next((i for i, b in enumerate(batches) if not statically_known_true(b == 1)), None)
    for i, t in enumerate((q, k, v)):
        heads = -1
        if i == 0 and statically_known_true(t.shape[1] == 1) and not statically_known_true(k.shape[1] == 1):
            heads = graph.call_method("size", (site.key, 1))
        expand_batch = widest is not None and i != widest and statically_known_true(batches[i] == 1)
        if expand_batch or heads != -1:
            batch = graph.call_method("size", (nodes[widest], 0)) if expand_batch else -1
            nodes[i] = graph.call_method("expand", (nodes[i], batch, heads, -1, -1))
    return tuple(nodes)


def report_unconverted_softmax(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Softmax attention that canonicalize walked from but could not turn into SDPA (soft-capped scores,
    unsupported spellings): each is an attention site left, counted in sites_left and warned about once
    with its source line. Returns (location, reason) per site."""
    from burstc.passes.canonicalize import canonicalize_result

    left = [(s.location, s.reason) for graph in graphs(gm) for s in getattr(canonicalize_result(graph), "skipped", [])]
    return _report_left(left)


def report_attention_in_bodies(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """Attention inside a higher-order op's body that the pipeline does not inline (a selective checkpoint
    region, torch.cond, ...): each is a site left, counted and warned about like the others."""
    return _report_left([(describe(node), why) for node, why in attention_in_bodies(gm)])


def _report_left(left: list[tuple[str, str]]) -> list[tuple[str, str]]:
    for where, why in left:
        counters["burst"]["sites_left"] += 1
        if (where, why) not in _logged:
            _logged.add((where, why))
            log.warning("burst: attention at %s left as it is (it runs whole on every rank): %s", where, why)
    return left
