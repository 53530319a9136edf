"""graph_boundary: what a compiled burst graph does at its edges with SequenceShards. An input that
arrives as a shard of the graph's own partition is taken as this rank's rows (no gather, no re-slice);
one of another partition, or reaching a graph that is not partitioned, is gathered whole; a sharded
output leaves as a SequenceShard (outputs='lazy'), gathered only if something reads it.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch.fx as fx

from burstc.passes.shard_rules import SeqDim
from burstc.runtime.sequence_shard import SequenceShard, ShardSpec, from_local, to_full, to_local


def arriving_shards(gm: fx.GraphModule) -> dict[int, ShardSpec]:
    """Position -> spec of each graph input Dynamo saw as a SequenceShard."""
    found = {}
    for i, node in enumerate(gm.graph.find_nodes(op="placeholder")):
        value = node.meta.get("example_value")
        if isinstance(value, SequenceShard):
            found[i] = value.spec
    return found


class GraphBoundary:
    """The inputs of one graph as its compiled code sees them: `takes` (position -> spec) arrive as this
    rank's rows, `gathers` (positions) whole. example_inputs are the compiler's, with those swapped in."""

    def __init__(self, gm: fx.GraphModule, example_inputs, takes: dict[int, ShardSpec], gathers: set[int]):
        self.takes, self.gathers = takes, sorted(gathers)
        self.placeholders = gm.graph.find_nodes(op="placeholder")
        self.example_inputs = list(example_inputs)
        # the compilers read metadata only: Dynamo's own fakes of the rows (a real stand-in would be a tensor
        # Dynamo never saw, which AOTAutograd gives sizes without sources, and guards then fail)
        for i in takes:  # the rows need a gradient where the shard does (the graph's backward must give one)
            fake = self.placeholders[i].meta["example_value"]
            self.example_inputs[i] = fake.local.detach().requires_grad_(fake.requires_grad)
        for i in self.gathers:  # a whole tensor of the global shape (once: a fallback builds a second boundary)
            node = self.placeholders[i]
            fake = node.meta["example_value"]
            if isinstance(fake, SequenceShard):
                node.meta["example_value"] = fake.local.new_empty(fake.shape).requires_grad_(fake.requires_grad)
            self.example_inputs[i] = node.meta["example_value"]

    @property
    def seq_len(self) -> Optional[int]:
        return next(iter(self.takes.values())).seq_len if self.takes else None

    @property
    def layout(self) -> Optional[str]:
        return next(iter(self.takes.values())).layout if self.takes else None

    def arriving_dims(self) -> dict[str, SeqDim]:
        """Placeholder name -> where its sequence is, for the shard pass."""
        return {self.placeholders[i].name: SeqDim(spec.dim, spec.outer, spec.inner) for i, spec in self.takes.items()}

    def wrap(self, compiled: Callable, outputs: dict[int, ShardSpec]) -> Callable:
        """compiled with its inputs and outputs converted at the edges (compiled itself when nothing is)."""
        if not (self.takes or self.gathers or outputs):
            return compiled
        return _AtTheEdges(compiled, sorted(self.takes), self.gathers, outputs)


class _AtTheEdges:
    """Calls a compiled graph with arriving shards made local or whole, and wraps its sharded outputs."""

    def __init__(self, compiled: Callable, takes: list[int], gathers: list[int], outputs: dict[int, ShardSpec]):
        self.compiled, self.takes, self.gathers, self.outputs = compiled, takes, gathers, outputs

    def __call__(self, *args):
        args = list(args)
        for i in self.takes:
            args[i] = to_local(args[i])  # Dynamo guards the input's type: it is a SequenceShard
        for i in self.gathers:
            args[i] = to_full(args[i]) if isinstance(args[i], SequenceShard) else args[i]
        results = self.compiled(*args)  # Dynamo's convention for what a backend returns
        if not self.outputs:
            return results
        results = list(results)
        for i, spec in self.outputs.items():
            results[i] = from_local(results[i], spec)
        return results
