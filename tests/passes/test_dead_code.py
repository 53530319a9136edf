"""remove_dead_code: what nobody reads goes, what changes state stays (FX's own pass treats every method
as pure)."""
import operator

import torch
import torch.fx as fx

from burstc.passes.dead_code import remove_dead_code


def _graph(build):
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(build(graph, x))
    return fx.GraphModule(torch.nn.Module(), graph)


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]


def test_an_in_place_update_whose_result_is_unused_stays():
    def build(g, x):
        out = g.call_function(torch.relu, (x,))
        g.call_method("add_", (out, g.call_method("sum", (x,))))  # out.add_(...): its result is unused
        return out
    gm = remove_dead_code(_graph(build))
    assert _ops(gm) == [torch.relu, "sum", "add_"]
    x = torch.randn(4)
    assert torch.equal(gm(x), torch.relu(x) + x.sum())


def test_pure_chains_nobody_reads_go_and_operator_and_is_pure():
    def build(g, x):
        q = g.call_method("unsqueeze", (x, 0))
        dead = g.call_function(operator.and_, (g.call_function(operator.le, (q, x)), g.call_function(operator.ge, (q, x))))
        g.call_method("to", (dead, torch.device("cpu")))
        return g.call_function(torch.relu, (x,))
    assert _ops(remove_dead_code(_graph(build))) == [torch.relu]


def test_setitem_and_out_arguments_stay():
    def build(g, x):
        y = g.call_function(torch.zeros_like, (x,))
        g.call_function(operator.setitem, (y, 0, 1.0))
        g.call_function(torch.add, (x, x), {"out": y})
        return y
    assert _ops(remove_dead_code(_graph(build))) == [torch.zeros_like, operator.setitem, torch.add]
