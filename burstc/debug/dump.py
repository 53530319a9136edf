"""Compile-time dumps of one burst compilation: the graph before and after each pass, each site's plan
(report + picture), the kernels it uses, and summary.json tying them together. Written to
`dump_dir/<graph id>_rank<r>/` when the dump_dir option (BURST_DUMP_DIR) is set; the same text also
goes to TORCH_TRACE as tlparse artifacts ("burst_*") and, at DEBUG, to the `burstc.dump` logger
(TORCH_LOGS="+burstc")."""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Optional

import sympy
import torch
import torch.fx as fx

from burstc.debug.render import plan_picture, plan_report, site_ring
from burstc.schedule.cost import backward_for_plan
from burstc.passes.plan import SitePlan

log = logging.getLogger("burstc.dump")


def graph_code(gm: fx.GraphModule) -> str:
    """Readable Python of the graph, with the user's source lines as comments."""
    return gm.print_readable(print_output=False, include_stride=False, include_device=True)


def _concrete(size, fallback: int = 0) -> int:
    """An int for a size that may be a sympy expression (its hint from Dynamo's shape env, when known)."""
    if isinstance(size, int):
        return size
    try:
        return int(size)
    except TypeError:
        return fallback


def _hint(plan: SitePlan) -> tuple[int, bool]:
    """(a concrete sequence length for the site's example plan, whether it is symbolic)."""
    if isinstance(plan.seq_len, int):  # the global length (in sequence mode q's example is a local shard)
        return plan.seq_len, False
    q = plan.site.tensor("query")
    size = q.shape[2]
    if isinstance(size, torch.SymInt):
        hint = size.node.hint
        return (int(hint) if hint is not None else 0), True
    return int(size), False


@dataclass
class CompilationDump:
    """Collects the artefacts of one compiled graph; `write()` puts them on disk and in the logs."""

    graph_id: str
    rank: int
    world_size: int
    dump_dir: Optional[str]
    files: dict[str, str] = field(default_factory=dict)  # file name -> text
    pictures: list[tuple[str, object]] = field(default_factory=list)  # (file name, RingPlan)
    summary: dict = field(default_factory=dict)

    @property
    def folder(self) -> Optional[str]:
        return os.path.join(self.dump_dir, f"{self.graph_id}_rank{self.rank}") if self.dump_dir else None

    def add_graph(self, stage: str, gm: fx.GraphModule) -> None:
        index = sum(name.endswith(".py") for name in self.files)
        self.files[f"{index}_{stage}.py"] = graph_code(gm)

    def add_text(self, name: str, text: str) -> None:
        """A report of a pass (e.g. the sharding table) under its file name."""
        self.files[name] = text

    def add_plans(self, plans: list[SitePlan], kernel_sources: Optional[dict[str, str]] = None) -> None:
        sites = []
        for plan in plans:
            site = plan.site
            entry = {"name": site.name, "source": site.source, "converted": plan.converts, "reason": plan.reason,
                     "mask": site.mask_kind}
            if plan.converts:
                seq_len, symbolic = _hint(plan)
                q = site.tensor("query")
                ring, shape = site_ring(plan, self.world_size, max(seq_len, 1), _concrete(q.shape[0], 1))
                notes = [f"source: {site.source}" if site.source else "source: (no stack trace)",
                         f"the sequence length is dynamic ({plan.seq_len}); the tables show the plan for the "
                         f"example length {seq_len}" if symbolic else "the sequence length is static"]
                notes += [plan.schedule_note] if plan.schedule_note else []
                report = plan_report(ring, shape, title=f"attention site {site.name}", scale=plan.scale,
                                     scheme=plan.backward, notes=notes, predictions=plan.predictions)
                self.files[f"site_{site.name}.md"] = report
                self.pictures.append((f"site_{site.name}.png", ring))
                entry.update(layout=plan.layout, backward=backward_for_plan(shape, ring, plan.backward),
                             schedule=ring.schedule,
                             node_size=plan.node_size or self.world_size,
                             predicted_ms={name: None if p.total_s is None else float(p.total_s) * 1e3
                                           for name, p in plan.predictions.items()},
                             causal=plan.causal, scale=plan.scale,
                             seq_len=str(plan.seq_len), example_seq_len=seq_len, world_size=self.world_size,
                             plan_file=f"site_{site.name}.md", picture=f"site_{site.name}.png",
                             cost={k: (str(v) if isinstance(v, sympy.Basic) else v) for k, v in plan.cost.items()},
                             skipped_pairs=ring.skipped_pairs())
            sites.append(entry)
        for name, source in (kernel_sources or {}).items():
            self.files[os.path.join("kernels", f"{name}.py")] = source
        self.summary = {
            "graph": self.graph_id, "rank": self.rank, "world_size": self.world_size, "sites": sites,
            "graphs": sorted(n for n in self.files if n.endswith(".py") and not n.startswith("kernels")),
            "kernels": sorted(n for n in self.files if n.startswith("kernels")),
            "totals": {"converted": sum(s["converted"] for s in sites),
                       "left": sum(not s["converted"] for s in sites)},
        }

    def write(self) -> Optional[str]:
        payloads = dict(self.files)
        payloads["summary.json"] = json.dumps(self.summary, indent=2, default=str)
        for name, text in payloads.items():
            artifact = f"burst_{self.graph_id}_{name.replace(os.sep, '_')}"
            torch._logging.trace_structured("artifact", metadata_fn=lambda a=artifact: {"name": a, "encoding": "string"},
                                            payload_fn=lambda t=text: t)
            log.debug("%s:\n%s", artifact, text)
        folder = self.folder
        if folder is None:
            return None
        os.makedirs(os.path.join(folder, "kernels"), exist_ok=True)
        for name, text in payloads.items():
            with open(os.path.join(folder, name), "w") as f:
                f.write(text)
        for name, ring in self.pictures:
            if plan_picture(ring, os.path.join(folder, name)) is None:
                log.warning("burst: no schedule picture (matplotlib missing: pip install 'burstc[debug]')")
        log.info("burst: dumped graph %s to %s", self.graph_id, folder)
        return folder
