"""canonicalize_attention on real Dynamo graphs: hand-written attention becomes one SDPA call with the
right mask/scale kwargs and the compiled model equals eager (outputs and gradients); anything not
provably attention, or not exactly rewritable, is left as it is."""
import math
import operator

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._dynamo.utils import counters

from burstc.passes import canonicalize_attention, canonicalize_result
from burstc.passes.attention_spellings import einsum_form
from burstc.passes.canonicalize import SDPA
from burstc.runtime.modified_sdpa import modified_sdpa

B, T, C, H = 2, 8, 32, 4
D = C // H
N_CTX = 16          # size of the mask buffers (>= T: the models slice them)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(1234)
    yield
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

class Captured:
    def __init__(self, code_before, gm):
        self.code_before, self.gm = code_before, gm

    @property
    def result(self):
        return canonicalize_result(self.gm)

    def sdpa_nodes(self):
        return [n for n in self.gm.graph.nodes if n.op == "call_function" and n.target is SDPA]

    def softmax_nodes(self):
        return [n for n in self.gm.graph.nodes
                if (n.op == "call_function" and n.target in (F.softmax, torch.softmax))
                or (n.op == "call_method" and n.target == "softmax")]


def compile_with_pass(model, dynamic=False):
    """torch.compile with a backend that runs the pass and then the graph as it is."""
    captured = []

    def backend(gm, example_inputs):
        code_before = gm.code
        canonicalize_attention(gm, example_inputs)
        captured.append(Captured(code_before, gm))
        return gm.forward

    return torch.compile(model, backend=backend, fullgraph=True, dynamic=dynamic), captured


def run_and_grads(fn, model, inputs, weight_seed=0):
    """Outputs, and gradients of a random weighting of them w.r.t. params and float inputs."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    g = torch.Generator().manual_seed(weight_seed)
    loss = sum((o * torch.randn(o.shape, generator=g)).sum() for o in outputs)
    wrt = [p for p in model.parameters()] + [x for x in inputs if x.requires_grad]
    return [o.detach() for o in outputs], torch.autograd.grad(loss, wrt)


def assert_same_as_eager(model, compiled, inputs):
    eager_out, eager_grads = run_and_grads(model, model, inputs)
    comp_out, comp_grads = run_and_grads(compiled, model, inputs)
    for a, b in zip(comp_out + list(comp_grads), eager_out + list(eager_grads)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def assert_converted(captured, n_sites, **kwargs):
    """One graph, n_sites SDPA calls with the given kwargs, no softmax left."""
    assert len(captured) == 1
    graph = captured[0]
    nodes = graph.sdpa_nodes()
    assert len(nodes) == n_sites, graph.gm.code
    assert graph.softmax_nodes() == []
    assert len(graph.result.converted) == n_sites and graph.result.skipped == []
    assert counters["burst"]["canonicalized"] == n_sites
    for node in nodes:
        for key, want in kwargs.items():
            got = node.kwargs[key]
            assert (got == pytest.approx(want)) if isinstance(want, float) else (got is want), (key, got)
    return graph


def assert_untouched(captured, reason=None):
    assert len(captured) == 1
    graph = captured[0]
    assert graph.gm.code == graph.code_before
    assert graph.result.converted == []
    if reason is None:
        assert graph.result.skipped == []
    else:
        assert len(graph.result.skipped) == 1 and reason in graph.result.skipped[0].reason
        assert counters["burst"]["canonicalize_skipped"] == 1
    return graph


def x_input(t=T):
    return (torch.randn(B, t, C, requires_grad=True),)


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------

class QKVBlock(nn.Module):
    """Projections shared by the models: forward builds q, k, v as [B, H, T, D]."""

    def __init__(self, kv_heads=H):
        super().__init__()
        self.kv_heads = kv_heads
        self.q_proj = nn.Linear(C, C)
        self.kv_proj = nn.Linear(C, 2 * kv_heads * D)
        self.out = nn.Linear(C, C)

    def qkv(self, x):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, H, D).transpose(1, 2)
        k, v = self.kv_proj(x).split(self.kv_heads * D, dim=2)
        k = k.view(b, t, self.kv_heads, D).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, D).transpose(1, 2)
        return q, k, v

    def merge(self, y):
        b, _, t, _ = y.shape
        return self.out(y.transpose(1, 2).contiguous().view(b, t, C))


class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention, slow path: tril buffer, masked_fill, softmax, dropout."""

    def __init__(self, dropout=0.0, return_weights=False):
        super().__init__()
        self.c_attn = nn.Linear(C, 3 * C)
        self.c_proj = nn.Linear(C, C)
        self.attn_dropout = nn.Dropout(dropout)
        self.return_weights = return_weights
        self.register_buffer("bias", torch.tril(torch.ones(N_CTX, N_CTX)).view(1, 1, N_CTX, N_CTX))

    def forward(self, x):
        b, t, c = x.size()
        q, k, v = self.c_attn(x).split(c, dim=2)
        k = k.view(b, t, H, c // H).transpose(1, 2)
        q = q.view(b, t, H, c // H).transpose(1, 2)
        v = v.view(b, t, H, c // H).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        y = self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))
        return (y, att) if self.return_weights else y


class SqrtScaledAttention(QKVBlock):
    """Divides by math.sqrt(d); causal mask built in the graph with triu(ones, 1).bool()."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        t = x.shape[1]
        att = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(D)
        mask = torch.triu(torch.ones(t, t, device=x.device), diagonal=1).bool()
        att = att.masked_fill(mask, float("-inf")).softmax(-1)
        return self.merge(torch.matmul(att, v))


class EinsumAttention(QKVBlock):
    """einsum spellings, q scaled before the product, softmax over dim=3, no mask."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        att = torch.einsum("bhqd,bhkd->bhqk", q * D ** -0.5, k)
        att = torch.softmax(att, dim=3)
        return self.merge(torch.einsum("bhqk,bhkd->bhqd", att, v))


class AdditiveMaskAttention(QKVBlock):
    """Float mask input added after scaling; k.permute swaps the last two dims."""

    def forward(self, x, mask):
        q, k, v = self.qkv(x)
        att = (q @ k.permute(0, 1, 3, 2)) * (1.0 / math.sqrt(D)) + mask
        att = F.softmax(att, dim=-1, dtype=None)
        return self.merge(att @ v)


class BiasThenMaskAttention(QKVBlock):
    """T5's order: a learned position bias [1, H, T, T] added to the scores, then a padding mask [B, 1, 1, T]."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, H, T, T))

    def forward(self, x, padding):
        q, k, v = self.qkv(x)
        att = (q @ k.transpose(2, 3)) * D ** -0.5
        att = att + self.bias
        att = att + padding
        return self.merge(F.softmax(att, dim=-1) @ v)


class MaskedFillThenAddAttention(QKVBlock):
    def forward(self, x, hidden, bias):
        q, k, v = self.qkv(x)
        att = (q @ k.transpose(2, 3)).masked_fill(hidden, float("-inf")) + bias
        return self.merge(F.softmax(att, dim=-1) @ v)


class BoolMaskGQAAttention(QKVBlock):
    """Grouped K/V heads repeated with repeat_interleave, boolean keep-mask input."""

    def __init__(self):
        super().__init__(kv_heads=H // 2)

    def forward(self, x, keep):
        q, k, v = self.qkv(x)
        k, v = k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1)
        att = (q @ k.transpose(2, 3)) * D ** -0.5
        att = att.masked_fill(~keep, float("-inf"))
        return self.merge(att.softmax(dim=-1) @ v)


class BaddbmmAttention(QKVBlock):
    """baddbmm over [B*H, T, D] views of 4-D q/k (beta=0), a 2-D bool tril buffer."""

    def __init__(self):
        super().__init__()
        self.register_buffer("keep", torch.ones(N_CTX, N_CTX, dtype=torch.bool).tril())

    def forward(self, x):
        q, k, v = self.qkv(x)
        b, h, t, d = q.shape
        scores = torch.empty(b * h, t, t, dtype=q.dtype, device=q.device)
        att = torch.baddbmm(scores, q.reshape(b * h, t, d), k.transpose(-1, -2).reshape(b * h, d, t),
                            beta=0.0, alpha=1.0 / math.sqrt(d)).view(b, h, t, t)
        att = att.masked_fill(self.keep[:t, :t].logical_not(), float("-inf"))
        return self.merge(F.softmax(att, dim=-1) @ v)


class BandBufferAttention(NanoGPTAttention):
    """nanoGPT code but the buffer is a sliding window, not tril: must become attn_mask, not causal."""

    def __init__(self):
        super().__init__()
        band = torch.tril(torch.ones(N_CTX, N_CTX)) * torch.triu(torch.ones(N_CTX, N_CTX), diagonal=-2)
        self.bias.copy_(band.view(1, 1, N_CTX, N_CTX))


class SoftmaxClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(C, C)
        self.head = nn.Linear(C, 10)

    def forward(self, x):
        return F.softmax(self.head(torch.relu(self.body(x))), dim=-1)


class FiniteFillAttention(QKVBlock):
    """masked_fill with -1e4: exp(-1e4 - max) is not provably 0 (scores are unbounded), so not exact."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        t = x.shape[1]
        mask = torch.triu(torch.ones(t, t), diagonal=1).bool()
        att = (q @ k.transpose(-2, -1) * D ** -0.5).masked_fill(mask, -1e4)
        return self.merge(att.softmax(-1) @ v)


class ScaleAfterMaskAttention(QKVBlock):
    """(q kᵀ + mask) * c is not SDPA's q kᵀ * c + mask."""

    def forward(self, x, mask):
        q, k, v = self.qkv(x)
        att = (q @ k.transpose(-2, -1) + mask) * D ** -0.5
        return self.merge(att.softmax(-1) @ v)


class NegativeScaleAfterMaskAttention(QKVBlock):
    """-inf * (negative) is +inf: a scale after masked_fill must be positive."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        t = x.shape[1]
        att = (q @ k.transpose(-2, -1)).masked_fill(torch.triu(torch.ones(t, t), 1).bool(), float("-inf"))
        return self.merge((att * -0.3).softmax(-1) @ v)


class MaskFromScoresAttention(QKVBlock):
    """The mask is computed from the scores themselves."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        att = q @ k.transpose(-2, -1)
        return self.merge(att.masked_fill(att < -1.0, float("-inf")).softmax(-1) @ v)


class SinkAttention(QKVBlock):
    """GPT-OSS's eager attention: a learned per-head sink logit joins the softmax and is sliced off;
    optionally without the row-max shift, under a causal mask."""

    def __init__(self, shift=True, causal=False):
        super().__init__()
        self.sinks = nn.Parameter(torch.randn(H))
        self.shift, self.causal = shift, causal

    def forward(self, x):
        q, k, v = self.qkv(x)
        scores = q @ k.transpose(-1, -2) * D ** -0.5
        if self.causal:
            scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        sinks = self.sinks.reshape(1, -1, 1, 1).expand(q.shape[0], -1, q.shape[-2], -1)
        combined = torch.cat([scores, sinks], dim=-1)
        if self.shift:
            combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = F.softmax(combined, dim=-1)[..., :-1]
        return self.merge(probs @ v)


class SoftcapAttention(QKVBlock):
    """Gemma 2's eager attention: the scores soft-capped as cap * tanh(S / cap), then the mask, softmax in
    float32; `inside` puts the mask inside the tanh instead (tanh(-inf) = -1 hides nothing)."""

    def __init__(self, cap=5.0, inside=False):
        super().__init__()
        self.cap, self.inside = cap, inside

    def forward(self, x, mask):
        q, k, v = self.qkv(x)
        scores = q @ k.transpose(2, 3) * D ** -0.5
        if self.inside:
            scores = scores + mask
        scores = torch.tanh(scores / self.cap) * self.cap
        if not self.inside:
            scores = scores + mask
        return self.merge(F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v)


class PerQuerySinkAttention(QKVBlock):
    """An extra softmax column that differs per query row: not a per-head sink, so not converted."""

    def __init__(self):
        super().__init__()
        self.column = nn.Parameter(torch.randn(1, H, T, 1))

    def forward(self, x):
        q, k, v = self.qkv(x)
        scores = q @ k.transpose(-1, -2) * D ** -0.5
        combined = torch.cat([scores, self.column.expand(q.shape[0], -1, -1, -1)], dim=-1)
        return self.merge(F.softmax(combined, dim=-1)[..., :-1] @ v)


class ReweightedAttention(QKVBlock):
    """The weights go through an op the matcher does not know (a renormalisation) before P @ V."""

    def forward(self, x):
        q, k, v = self.qkv(x)
        probs = F.softmax(q @ k.transpose(-1, -2) * D ** -0.5, dim=-1)
        return self.merge(torch.sqrt(probs) @ v)


class Bmm3DAttention(QKVBlock):
    """3-D bmm attention over [B*H, T, D]: deliberately not converted, but reported."""

    def forward(self, x):
        q, k, v = (t.flatten(0, 1) for t in self.qkv(x))
        att = (torch.bmm(q, k.transpose(1, 2)) * D ** -0.5).softmax(-1)
        return self.merge(torch.bmm(att, v).view(x.shape[0], H, x.shape[1], D))


# ---------------------------------------------------------------------------------------------
# Converted
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_nanogpt_causal_buffer_becomes_causal_sdpa(training):
    model = NanoGPTAttention(dropout=0.0).train(training)
    compiled, captured = compile_with_pass(model)
    assert_same_as_eager(model, compiled, x_input())
    graph = assert_converted(captured, 1, is_causal=True, attn_mask=None, scale=1 / math.sqrt(D))
    site = graph.result.converted[0]
    assert site.mask == "causal" and site.spelling == "matmul"
    assert "test_canonicalize.py" in site.location
    bias = next(n for n in graph.gm.graph.nodes if n.op == "placeholder" and n.name.endswith("buffers_bias_"))
    assert not bias.users  # the mask slice and comparison are gone with the proof
    code = graph.gm.code
    canonicalize_attention(graph.gm)  # idempotent
    assert graph.gm.code == code and canonicalize_result(graph.gm).converted == []


def test_sqrt_scaled_in_graph_triu_mask():
    model = SqrtScaledAttention()
    compiled, captured = compile_with_pass(model)
    assert_same_as_eager(model, compiled, x_input())
    assert_converted(captured, 1, is_causal=True, attn_mask=None, scale=1 / math.sqrt(D))


def test_sqrt_scaled_dynamic_length_compiles_once():
    model = SqrtScaledAttention()
    compiled, captured = compile_with_pass(model, dynamic=True)
    assert_same_as_eager(model, compiled, x_input(T))
    assert_same_as_eager(model, compiled, x_input(T + 5))
    assert_converted(captured, 1, is_causal=True, attn_mask=None)


def test_nanogpt_dynamic_length_and_dropout_p_guard():
    """Under dynamic=True the dropout p is a graph input that Dynamo specialised (guarded) to 0:
    converted, one graph for two lengths; setting p > 0 recompiles and that graph stays."""
    model = NanoGPTAttention(dropout=0.0).train()
    compiled, captured = compile_with_pass(model, dynamic=True)
    assert_same_as_eager(model, compiled, x_input(T))
    assert_same_as_eager(model, compiled, x_input(T + 3))
    assert_converted(captured, 1, is_causal=True, attn_mask=None, scale=1 / math.sqrt(D))
    model.attn_dropout.p = 0.1
    compiled(*x_input())
    assert len(captured) == 2
    assert_untouched(captured[1:], reason="dropout")


def test_einsum_spelling():
    model = EinsumAttention()
    compiled, captured = compile_with_pass(model)
    assert_same_as_eager(model, compiled, x_input())
    graph = assert_converted(captured, 1, is_causal=False, attn_mask=None, scale=D ** -0.5)
    assert graph.result.converted[0].spelling == "einsum"


def test_additive_float_mask_input():
    model = AdditiveMaskAttention()
    compiled, captured = compile_with_pass(model)
    mask = torch.randn(B, 1, T, T)
    assert_same_as_eager(model, compiled, x_input() + (mask,))
    graph = assert_converted(captured, 1, is_causal=False, scale=1 / math.sqrt(D))
    attn_mask = graph.sdpa_nodes()[0].kwargs["attn_mask"]
    assert attn_mask.op == "placeholder" and graph.result.converted[0].mask == "additive"


def test_two_additive_masks_become_their_sum():
    """(S + bias) + padding = S + (bias + padding): one attn_mask, the bias's gradient through the sum."""
    model = BiasThenMaskAttention()
    compiled, captured = compile_with_pass(model)
    padding = torch.zeros(B, 1, 1, T).masked_fill(torch.rand(B, 1, 1, T) < 0.3, float("-inf"))
    padding[:, :, :, 0] = 0.0  # every query sees a key
    assert_same_as_eager(model, compiled, x_input() + (padding,))
    graph = assert_converted(captured, 1, is_causal=False, scale=D ** -0.5)
    attn_mask = graph.sdpa_nodes()[0].kwargs["attn_mask"]
    assert attn_mask.target is operator.add and graph.result.converted[0].mask == "additive"


def test_a_mask_op_beside_an_additive_mask_stays():
    model = MaskedFillThenAddAttention()
    compiled, captured = compile_with_pass(model)
    compiled(*x_input(), torch.rand(T, T) < 0.2, torch.randn(B, 1, T, T))
    assert_untouched(captured, reason="more than one mask on the scores")


def test_boolean_mask_and_repeated_kv_heads_become_gqa():
    model = BoolMaskGQAAttention()
    compiled, captured = compile_with_pass(model)
    keep = torch.rand(B, 1, T, T) > 0.4
    keep |= torch.eye(T, dtype=torch.bool)  # no fully masked row (eager NaN vs SDPA 0 there)
    assert_same_as_eager(model, compiled, x_input() + (keep,))
    graph = assert_converted(captured, 1, is_causal=False, enable_gqa=True)
    node = graph.sdpa_nodes()[0]
    assert node.kwargs["attn_mask"].op == "placeholder"  # ~keep was undone, not re-negated
    assert node.args[1].meta["example_value"].shape[1] == H // 2
    assert graph.result.converted[0].gqa_groups == 2


def test_baddbmm_with_bool_tril_buffer():
    model = BaddbmmAttention()
    compiled, captured = compile_with_pass(model)
    assert_same_as_eager(model, compiled, x_input())
    graph = assert_converted(captured, 1, is_causal=True, attn_mask=None, scale=1 / math.sqrt(D))
    assert graph.result.converted[0].spelling == "baddbmm"
    assert "baddbmm" not in graph.gm.code and "empty" not in graph.gm.code


def test_buffer_that_is_not_tril_becomes_attn_mask():
    model = BandBufferAttention()
    compiled, captured = compile_with_pass(model)
    assert_same_as_eager(model, compiled, x_input())
    graph = assert_converted(captured, 1, is_causal=False)
    assert graph.result.converted[0].mask == "bool"


# ---------------------------------------------------------------------------------------------
# Left untouched
# ---------------------------------------------------------------------------------------------

def test_non_attention_softmax_is_untouched():
    model = SoftmaxClassifier()
    compiled, captured = compile_with_pass(model)
    assert_same_as_eager(model, compiled, x_input())
    assert_untouched(captured)


def test_returned_attention_weights_stay():
    model = NanoGPTAttention(return_weights=True)
    compiled, captured = compile_with_pass(model)
    assert_same_as_eager(model, compiled, x_input())
    graph = assert_untouched(captured, reason="used elsewhere")
    assert "test_canonicalize.py" in graph.result.skipped[0].location


@pytest.mark.parametrize("shift,causal", [(True, False), (False, True)])
def test_attention_sinks_become_modified_sdpa(shift, causal):
    """GPT-OSS's sinks: one modified_sdpa call holding the [1, H, 1, 1] sink logits; exact, the sinks'
    gradient included."""
    model = SinkAttention(shift=shift, causal=causal)
    compiled, captured = compile_with_pass(model)
    assert_same_as_eager(model, compiled, x_input())
    (graph,) = captured
    nodes = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is modified_sdpa]
    assert len(nodes) == 1 and graph.softmax_nodes() == [] and graph.sdpa_nodes() == []
    assert nodes[0].kwargs["is_causal"] is causal
    assert tuple(nodes[0].kwargs["sinks"].meta["example_value"].shape) == (1, H, 1, 1)
    assert graph.result.converted[0].sinks == nodes[0].kwargs["sinks"].name


def _causal_bias():
    return torch.zeros(T, T).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf")).expand(B, 1, T, T)


def test_softcapped_scores_become_modified_sdpa():
    """Gemma 2's soft-cap: modified_sdpa(softcap=cap) with scale = cap * (the factors inside the tanh); exact."""
    model = SoftcapAttention(cap=5.0)
    compiled, captured = compile_with_pass(model)
    assert_same_as_eager(model, compiled, x_input() + (_causal_bias(),))
    (graph,) = captured
    (node,) = [n for n in graph.gm.graph.nodes if n.op == "call_function" and n.target is modified_sdpa]
    assert node.kwargs["softcap"] == 5.0 and node.kwargs["scale"] == pytest.approx(5.0 * (D ** -0.5 / 5.0))
    assert graph.result.converted[0].softcap == 5.0 and graph.softmax_nodes() == []


def test_a_mask_inside_the_softcap_stays():
    model = SoftcapAttention(inside=True)
    compiled, captured = compile_with_pass(model)
    compiled(*x_input(), _causal_bias())
    assert_untouched(captured, reason="inside the soft-cap")


def test_dropout_in_training_stays():
    model = NanoGPTAttention(dropout=0.1).train()
    compiled, captured = compile_with_pass(model)
    compiled(*x_input())
    assert_untouched(captured, reason="dropout")


@pytest.mark.parametrize("model_cls, extra, reason", [
    (FiniteFillAttention, (), "neither -inf nor a value <= -1e+09"),
    (ScaleAfterMaskAttention, (torch.randn(B, 1, T, T),), "scale is applied after the additive mask"),
    (NegativeScaleAfterMaskAttention, (), "not known to be positive"),
    (MaskFromScoresAttention, (), "also used elsewhere"),
    (Bmm3DAttention, (), "not a 4-D tensor"),
    (AdditiveMaskAttention, (torch.randn(T),), "fewer than 2 dims"),
    (PerQuerySinkAttention, (), "not one logit per head"),
    (ReweightedAttention, (), "pass through sqrt before P @ V"),
], ids=["finite-fill", "scale-after-mask", "negative-scale-after-mask", "mask-from-scores", "bmm-3d",
        "1-d-mask", "sinks", "unknown-op-on-weights"])
def test_inexact_forms_stay(model_cls, extra, reason):
    model = model_cls()
    compiled, captured = compile_with_pass(model)
    compiled(*x_input(), *extra)
    assert_untouched(captured, reason=reason)


@pytest.mark.parametrize("equation, form", [
    ("bhqd,bhkd->bhqk", "abt"),
    ("bhqd, bhdk -> bhqk", "ab"),
    ("bhqk,bhkd->bhqd", "ab"),
    ("bqhd,bkhd->bhqk", None),      # heads not leading
    ("bhqd,bhkd->bhkq", None),      # scores transposed
    ("bhqd,bhqd->bhqd", None),      # elementwise
    ("...qd,...kd->...qk", None),   # ellipsis
])
def test_einsum_forms(equation, form):
    assert einsum_form(equation) == form


# ---------------------------------------------------------------------------------------------
# HF transformers
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "dynamic"])
def test_hf_llama_eager_attention_is_converted(dynamic):
    """HF LLaMA's eager path: GQA repeat_kv, additive mask, softmax(dtype=float32).to(), dropout
    p=0. Under dynamic=True the scale is HF's self.scaling as a SymFloat graph input."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        attn_implementation="eager")
    model = transformers.LlamaForCausalLM(config)
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(0, 128, (B, T))

    def logits(fn):
        return lambda: fn(input_ids=ids, use_cache=False).logits

    compiled, captured = compile_with_pass(model, dynamic=dynamic)
    eager_out, eager_grads = run_and_grads(logits(model), model, ())
    comp_out, comp_grads = run_and_grads(logits(compiled), model, ())
    for a, b in zip(comp_out + list(comp_grads), eager_out + list(eager_grads)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    graph = assert_converted(captured, 2, is_causal=False, enable_gqa=True)
    assert {site.mask for site in graph.result.converted} == {"additive"}
    assert all("modeling_llama.py" in site.location for site in graph.result.converted)
    scales = [node.kwargs["scale"] for node in graph.sdpa_nodes()]
    if dynamic:
        assert all(isinstance(s, torch.fx.Node) and isinstance(s.meta["example_value"], torch.SymFloat)
                   for s in scales)
    else:
        assert scales == [0.25, 0.25]


class _FiniteFill(torch.nn.Module):
    """Causal masks spelled with a huge finite value: masked_fill(triu, finfo.min) and where(tril, S, -1e9)."""

    def __init__(self, spelling):
        super().__init__()
        self.spelling = spelling
        self.register_buffer("hidden", torch.rand(9, 9, generator=torch.Generator().manual_seed(1)) > 0.5)

    def forward(self, q, k, v):
        n = q.shape[2]
        s = q @ k.transpose(-2, -1) * 0.3
        if self.spelling == "masked_fill":
            upper = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
            s = s.masked_fill(upper, torch.finfo(s.dtype).min)
        elif self.spelling == "where":
            s = torch.where(torch.tril(torch.ones(n, n)).bool(), s, -1e9)
        else:  # a random mask with a finite fill: a fully hidden row would average its values
            s = s.masked_fill(self.hidden, -1e9)
        return torch.softmax(s, dim=-1) @ v


@pytest.mark.parametrize("spelling", ["masked_fill", "where"])
def test_finite_fill_under_a_causal_mask_becomes_causal_sdpa(spelling):
    model = _FiniteFill(spelling)
    compiled, captured = compile_with_pass(model)
    inputs = [torch.randn(2, 3, 9, 8, requires_grad=True) for _ in range(3)]
    assert_same_as_eager(model, compiled, inputs)
    (sdpa,) = captured[-1].sdpa_nodes()
    assert sdpa.kwargs.get("is_causal") is True and sdpa.kwargs.get("attn_mask") is None


def test_finite_fill_under_other_masks_is_left_with_the_reason():
    model = _FiniteFill("random")
    compiled, captured = compile_with_pass(model)
    compiled(*[torch.randn(1, 2, 9, 8) for _ in range(3)])
    result = canonicalize_result(captured[-1].gm)
    assert not captured[-1].sdpa_nodes() and "not provably causal" in result.skipped[0].reason
