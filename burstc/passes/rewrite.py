"""rewrite: every site whose plan converts becomes a `burst::attention` call (output 0 of the op
replaces the SDPA node); the other sites stay SDPA and their reason is logged once per site."""
from __future__ import annotations

import logging
import operator

import torch
import torch.fx as fx
from torch._dynamo.utils import counters

import burstc.runtime.op  # noqa: F401  (registers torch.ops.burst)
from burstc.config import BurstConfig
from burstc.passes.find_attention import rebind
from burstc.passes.plan import SitePlan

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
        graph = gm.graph
        with graph.inserting_before(site.node):
            verify_site = f"{graph_id}/{site.name}" if cfg.verify else ""
            call = graph.call_function(op, (
                site.query, site.key, site.value, site.attn_mask, site.key_padding, site.document_ids,
                list(site.mask_buffers), plan.causal, site.window_left, site.window_right, site.mask_mod,
                plan.scale, plan.enable_gqa, plan.layout,
                plan.backward, cfg.kernel, group_name, verify_site))
            out = graph.call_function(operator.getitem, (call, 0))
        out.meta.update(site.node.meta)
        site.node.replace_all_uses_with(out)
        graph.erase_node(site.node)
        counters["burst"]["sites_converted"] += 1
        log.info("burst: attention %s -> %s (layout %s, backward %s)%s", site.name, op,
                 plan.layout, plan.backward, f" at {site.source}" if site.source else "")
    gm.graph.lint()
    gm.recompile()
    return gm
