"""The masks pass never drops part of a mask: random compositions of HF transformers' mask functions
(`and_masks` / `or_masks` over causal, sliding-window, chunked (Llama 4), padding, packed-sequence,
bidirectional and blockwise masks, position remapping, offsets), built into a 4-D mask by HF's own
`sdpa_mask` (bool) / `eager_mask` (additive finfo.min) and handed to SDPA, compiled with the burst
backend in one process (world size 1) and compared with eager on fresh inputs: twice at one length,
then maybe at a second length (Dynamo's dynamic-shape recompile). At pass level, every site the pass
recognises has descriptors whose mask, evaluated on every (query, key) pair by the independent
reference (tests/runtime/reference.py::dense_mask), is exactly the mask the model materialised; every
other site keeps the materialised mask: recognised exactly or not at all, never dropped.

The module runs SDPA with a mask built in the graph, so the check is also one of the runtime's
first-call proof (burstc/runtime/mask_proof.py): it must never have to correct a recognition
(mask_proofs_failed stays 0). The bugs this file found have regression tests at the bottom.
About 30 s on 2 cores (one Dynamo compile per example)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, assume, event, given, note, settings, strategies as st
from torch._dynamo.utils import counters

from burstc.passes.canonicalize import canonicalize_attention
from burstc.passes.find_attention import SDPA_TARGETS
from burstc.passes.masks import recognize_masks
from burstc.runtime.masked_sdpa import additive_attention, masked_sdpa
from tests.runtime.reference import dense_mask

mu = pytest.importorskip("transformers.masking_utils")

B, H, D = 2, 2, 4
OPTIONS = {"inner": "aot_eager"}


# -- compositions ---------------------------------------------------------------------------------
# A composition is a nested tuple: ("and" | "or", (parts...)), ("remap", part) or a leaf
# (name, *constants). The module's forward builds the HF mask function from it over its tensor inputs.

def _mask_function(spec, env):
    kind, *args = spec
    if kind == "and":
        return mu.and_masks(*(_mask_function(s, env) for s in args[0]))
    if kind == "or":
        return mu.or_masks(*(_mask_function(s, env) for s in args[0]))
    if kind == "remap":  # as create_causal_mask does for packed sequences: the mask on position ids
        return mu.remap_positions_for_packed_sequence(_mask_function(args[0], env),
                                                      env["position_ids"].expand(env["batch"], -1))
    leaves = {
        "causal": lambda: mu.causal_mask_function,
        "bidirectional": lambda: mu.bidirectional_mask_function,
        "sliding_overlay": lambda w: mu.sliding_window_overlay(w),
        "sliding_causal": lambda w: mu.sliding_window_causal_mask_function(w),
        "sliding_bidirectional": lambda w: mu.sliding_window_bidirectional_mask_function(w),
        "chunked_overlay": lambda c: mu.chunked_overlay(c, env["left_padding"]),
        "chunked_causal": lambda c: mu.chunked_causal_mask_function(c, env["left_padding"]),
        "padding": lambda: mu.padding_mask_function(env["attention_mask"]),
        "packed": lambda: mu.packed_sequence_mask_function(env["packed"]),  # ids made in the graph
        "packed_input": lambda: mu.packed_sequence_mask_function(env["doc_ids"]),  # ids as an input
        "blockwise": lambda: mu.blockwise_overlay(env["block_ids"]),
    }
    return leaves[kind](*args)


def _describe(spec) -> str:
    kind, *args = spec
    if kind in ("and", "or"):
        return f"{kind}_masks({', '.join(_describe(s) for s in args[0])})"
    if kind == "remap":
        return f"remap({_describe(args[0])})"
    return f"{kind}({', '.join(map(str, args))})" if args else kind


class Composed(torch.nn.Module):
    """forward builds the composition's 4-D mask with HF's sdpa_mask (bool) or eager_mask (additive
    finfo.min) and attends with it. q, k, v come from one input, as in a model (one symbolic length
    after a dynamic recompile)."""

    def __init__(self, spec, builder="sdpa", hf_padding=False, q_offset=0, kv_offset=0, use_vmap=False,
                 mask_batch=None):
        super().__init__()
        self.spec, self.builder, self.hf_padding = spec, builder, hf_padding
        self.q_offset, self.kv_offset, self.use_vmap = q_offset, kv_offset, use_vmap
        self.mask_batch = mask_batch  # None: the batch size; 1: one mask broadcast over the batch

    def forward(self, qkv, attention_mask, position_ids, doc_ids, block_ids):
        q, k, v = qkv.unbind(0)
        packed = mu.find_packed_sequence_indices(position_ids)
        if packed is None:  # eager, one sequence per row (under tracing HF always returns the ids)
            packed = torch.zeros_like(position_ids)
        # Llama 4's left padding for the chunked mask (create_chunked_causal_mask)
        left_padding = (attention_mask.cumsum(dim=-1) == torch.zeros_like(attention_mask)).sum(dim=-1)
        batch = q.shape[0] if self.mask_batch is None else self.mask_batch
        env = dict(batch=batch, attention_mask=attention_mask, position_ids=position_ids, packed=packed, doc_ids=doc_ids,
                   block_ids=block_ids, left_padding=left_padding)
        kwargs = dict(batch_size=batch, q_length=q.shape[2], kv_length=k.shape[2], q_offset=self.q_offset,
                      kv_offset=self.kv_offset, mask_function=_mask_function(self.spec, env),
                      attention_mask=attention_mask if self.hf_padding else None, use_vmap=self.use_vmap,
                      device=q.device)
        if self.builder == "sdpa":
            mask = mu.sdpa_mask(allow_is_causal_skip=False, allow_is_bidirectional_skip=False, **kwargs)
        else:
            mask = mu.eager_mask(dtype=q.dtype, allow_is_bidirectional_skip=False, **kwargs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


# -- inputs ---------------------------------------------------------------------------------------

def _inputs(n, dtype, seed, pad_kinds=("left", "right"), pads=(3, 5), doc_lengths=None, starts=None):
    """Inputs of length n: qkv [3, B, H, N, D], a [B, N] bool padding mask per row ('left' / 'right'
    padding of `pads` tokens, 'none', random 'holes', 'all' padded), [B, N] position ids restarting
    per document (at 0, or at `starts`, kept below n), raw document ids, blockwise ids (-1: text)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for kind, p in zip(pad_kinds, pads):
        p = min(p, n)
        row = torch.ones(n, dtype=torch.bool)
        if kind == "left":
            row[:p] = False
        elif kind == "right":
            row[n - p:] = False
        elif kind == "holes":
            row = torch.rand(n, generator=g) > 0.3
        elif kind == "all":
            row[:] = False
        rows.append(row)
    if doc_lengths is None:  # a random packing per row
        doc_lengths = []
        for _ in range(B):
            count = int(torch.randint(0, 6, (), generator=g))
            cuts = sorted(set(torch.randint(1, n, (count,), generator=g).tolist()))
            bounds = [0, *cuts, n]
            doc_lengths.append([b - a for a, b in zip(bounds, bounds[1:])])
    positions = []
    for r, lengths in enumerate(doc_lengths):
        starts_r = [0] * len(lengths) if starts is None else starts[r]
        positions.append(torch.cat([torch.arange(m) + s % (n - m + 1) for m, s in zip(lengths, starts_r)]))
    doc_ids = torch.randint(0, 3, (B, n), generator=g).sort(dim=-1).values
    block_ids = torch.randint(-1, 3, (B, n), generator=g)
    qkv = torch.randn(3, B, H, n, D, generator=g, dtype=torch.float64).to(dtype)
    return qkv, torch.stack(rows), torch.stack(positions), doc_ids, block_ids


# -- the probe: burst's own backend, plus the pass on a copy of the same Dynamo graph ---------------

def _instrument(gm, targets, record):
    """Replace calls of targets by a wrapper that records (target, args, kwargs) and calls it."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in targets:
            def wrapper(*args, _target=node.target, **kwargs):
                record.append((_target, args, kwargs))
                return _target(*args, **kwargs)
            node.target = wrapper
    gm.recompile()


def _probe_backend(calls):
    """A backend that compiles with burst (what backend="burst" runs, with OPTIONS) and, on every call,
    first runs the Dynamo graph before and after the masks pass, recording each site's materialised
    mask, what the pass made of it, and both graphs' outputs."""
    burst = torch._dynamo.lookup_backend("burst")

    def backend(gm, example_inputs):
        work = canonicalize_attention(copy.deepcopy(gm), example_inputs)
        before = copy.deepcopy(work)
        after = recognize_masks(work)
        seen_before, seen_after = [], []
        _instrument(before, SDPA_TARGETS, seen_before)
        _instrument(after, (*SDPA_TARGETS, masked_sdpa, additive_attention), seen_after)
        start = dict(counters["burst"])
        compiled = burst(gm, example_inputs, options=OPTIONS)
        for key in ("recognised", "materialised"):  # burst's own run of the pass did the same
            done = counters["burst"][f"masks_{key}"] - start.get(f"masks_{key}", 0)
            assert done == len(after.meta["burst_masks"][key]), (key, done, after.meta["burst_masks"])

        def run(*args):
            seen_before.clear()
            seen_after.clear()
            with torch.no_grad():
                want, got = before(*args), after(*args)
            calls.append(dict(record=after.meta["burst_masks"], before=list(seen_before), after=list(seen_after),
                              outputs=(want[0], got[0])))
            return compiled(*args)
        return run
    return backend


def _visible(mask, fill):
    """The bool mask (True = attend) of a materialised mask, bool or HF's additive where(M, 0, fill)."""
    if mask.dtype == torch.bool:
        assert fill is None, "a boolean mask recognised with an additive fill"
        return mask
    assert fill is not None, "an additive mask recognised as a boolean one"
    assert bool(((mask == 0) | (mask == fill)).all()), f"additive mask with values other than 0 and {fill}"
    return mask == 0


def _site(call):
    (_, args, kwargs), = call["before"]
    mask = kwargs["attn_mask"] if "attn_mask" in kwargs else args[3]
    (target, _, after_kwargs), = call["after"]
    return mask, target, after_kwargs


def _check_site(call, n):
    """Pass level: one site, recognised or materialised (never neither); a recognised one's descriptors
    are exactly the materialised mask; the rewritten graph computes what the original computed."""
    record = call["record"]
    assert len(record["recognised"]) + len(record["materialised"]) == 1, record
    mask, target, kwargs = _site(call)
    if record["recognised"]:
        assert target is masked_sdpa, (target, record)
        left, right = kwargs.get("window_left"), kwargs.get("window_right")
        want = dense_mask(B, n, causal=kwargs.get("is_causal", False),
                          window=None if left is None and right is None else (left, right),
                          key_padding=kwargs.get("key_padding"), document_ids=kwargs.get("document_ids"))
        have = _visible(mask, kwargs.get("fill")).expand(B, 1, n, n)
        wrong = (want != have).nonzero().tolist()
        assert not wrong, (f"recognised as {record['recognised'][0][1]}, but the descriptors differ from the "
                           f"materialised mask at (b, h, q, kv) = {wrong[:8]} ({len(wrong)} pairs)")
    else:
        assert target is not masked_sdpa, (target, record)
    want, got = call["outputs"]
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _run_case(module, input_sets):
    """Compile once (Dynamo recompiles at a new length); per input set: the pass-level checks and
    compiled against eager. Returns the pass's record of the first compile."""
    torch._dynamo.reset()
    counters.clear()
    calls = []
    compiled = torch.compile(module, backend=_probe_backend(calls), fullgraph=True)
    for n, inputs in input_sets:
        with torch.no_grad():
            want = module(*inputs)
            got = compiled(*inputs)
        _check_site(calls[-1], n)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m: f"compiled != eager at N={n}: {m}")
    # never dropped: every graph's one site was recognised or materialised (counted twice: the probe's
    # copy of the pass and burst's own run)
    total = counters["burst"]["masks_recognised"] + counters["burst"]["masks_materialised"]
    assert total == 2 * counters["burst"]["graphs"] >= 2, dict(counters["burst"])
    # the runtime's first-call proof (burstc/runtime/mask_proof.py) agreed with every recognition: at
    # these lengths it samples every position, so a failed proof is a mis-recognition it caught
    assert counters["burst"]["mask_proofs_failed"] == 0, dict(counters["burst"])
    return calls[0]["record"]


# -- the property ---------------------------------------------------------------------------------

_windows = st.integers(1, 44)
_chunks = st.integers(1, 24)
_leaf = st.one_of(
    st.just(("causal",)), st.just(("bidirectional",)), st.just(("padding",)), st.just(("packed",)),
    st.just(("packed_input",)), st.just(("blockwise",)),
    st.tuples(st.just("sliding_overlay"), _windows), st.tuples(st.just("sliding_causal"), _windows),
    st.tuples(st.just("sliding_bidirectional"), st.integers(0, 12)),
    st.tuples(st.just("chunked_overlay"), _chunks), st.tuples(st.just("chunked_causal"), _chunks))
_general = st.recursive(_leaf, lambda parts: st.one_of(
    st.tuples(st.sampled_from(["and", "or"]), st.lists(parts, min_size=1, max_size=3).map(tuple)),
    st.tuples(st.just("remap"), parts)), max_leaves=5)


@st.composite
def _hf_like(draw):
    """What create_causal_mask / create_sliding_window_causal_mask / create_chunked_causal_mask build:
    a base, maybe or'ed with a blockwise overlay, remapped to positions and and'ed with the packed ids
    when packed, maybe and'ed with more conjuncts."""
    base = draw(st.one_of(st.just(("causal",)), st.tuples(st.just("sliding_causal"), _windows),
                          st.tuples(st.just("chunked_causal"), _chunks), st.just(("bidirectional",)),
                          st.tuples(st.just("sliding_overlay"), _windows)))
    if draw(st.integers(0, 5)) == 0:
        base = ("or", (base, ("blockwise",)))
    parts = [base]
    if draw(st.booleans()):  # packed sequences
        parts = [("remap", base) if draw(st.booleans()) else base, ("packed",)]
    parts += draw(st.lists(st.one_of(st.just(("padding",)), st.just(("causal",)),
                                     st.tuples(st.just("sliding_overlay"), _windows), _leaf), max_size=2))
    parts = draw(st.permutations(parts))
    return ("and", tuple(parts)) if len(parts) > 1 or draw(st.booleans()) else parts[0]


@st.composite
def _conjunction(draw):
    """and_masks (maybe nested) of parts the pass describes: causal, windows, padding, packed ids made
    from position ids, and bounds on those position ids (remap) beside them."""
    pool = st.one_of(st.just(("causal",)), st.just(("padding",)), st.just(("packed",)),
                     st.tuples(st.just("sliding_overlay"), _windows), st.tuples(st.just("sliding_causal"), _windows),
                     st.tuples(st.just("remap"), st.one_of(st.just(("causal",)),
                                                           st.tuples(st.just("sliding_causal"), _windows))))
    parts = draw(st.lists(pool, min_size=1, max_size=4))
    if any(p[0] == "remap" for p in parts) and draw(st.integers(0, 4)):
        parts.append(("packed",))  # position bounds hold only inside one document
    if len(parts) > 2 and draw(st.booleans()):
        parts = [("and", tuple(parts[:2])), *parts[2:]]
    return ("and", tuple(parts))


@st.composite
def _input_args(draw, n):
    """Keyword arguments of _inputs for length n (drawn, so that hypothesis shrinks them)."""
    kinds = st.sampled_from(["none", "left", "right", "left", "right", "holes", "all"])
    return dict(pad_kinds=tuple(draw(kinds) for _ in range(B)), pads=tuple(draw(st.integers(0, n)) for _ in range(B)),
                starts=None if draw(st.booleans()) else [draw(st.lists(st.integers(0, 40), min_size=6, max_size=6))
                                                         for _ in range(B)],
                seed=draw(st.integers(0, 2**16)))


@settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink],
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
@given(data=st.data())
def test_compositions_are_recognised_exactly_or_materialised(data):
    spec = data.draw(st.one_of(_conjunction(), _hf_like(), _general), label="composition")
    config = dict(builder=data.draw(st.sampled_from(["sdpa", "sdpa", "eager"]), label="builder"),
                  hf_padding=data.draw(st.booleans(), label="hf_padding"),
                  q_offset=data.draw(st.sampled_from([0, 0, 0, 0, 1, 3]), label="q_offset"),
                  kv_offset=data.draw(st.sampled_from([0, 0, 0, 0, 2]), label="kv_offset"),
                  use_vmap=data.draw(st.sampled_from([False, False, True]), label="use_vmap"),
                  mask_batch=data.draw(st.sampled_from([None, None, 1]), label="mask_batch"))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    n = data.draw(st.integers(16, 40), label="N")
    lengths = [n, n] + ([data.draw(st.integers(16, 40), label="second N")] if data.draw(st.booleans()) else [])
    module = Composed(spec, **config)
    note(f"{_describe(spec)} {config} {dtype}")
    input_sets = []
    for length in lengths:
        inputs = _inputs(length, dtype, **data.draw(_input_args(length), label=f"inputs at N={length}"))
        try:  # a composition HF itself cannot build (offsets indexing past the ids, a remap of one batch row
            with torch.no_grad():  # over two) is not counted
                module(*inputs)
        except (IndexError, RuntimeError):
            assume(False)
        input_sets.append((length, inputs))
    record = _run_case(module, input_sets)
    event("recognised" if record["recognised"] else "materialised")


# -- fixed compositions: the pass is not vacuous (these are recognised), and what it must keep -------

_FIXED = [
    ("causal & padding", ("and", (("causal",), ("padding",))), {}, "recognised"),
    ("HF padding argument", ("causal",), dict(hf_padding=True), "recognised"),
    ("sliding window", ("sliding_causal", 5), {}, "recognised"),
    ("window without causal", ("sliding_overlay", 7), {}, "recognised"),
    ("packed, remapped", ("and", (("remap", ("sliding_causal", 6)), ("packed",))), dict(hf_padding=True),
     "recognised"),
    ("eager additive causal", ("causal",), dict(builder="eager"), "recognised"),
    ("offsets: rows with no key", ("causal",), dict(kv_offset=2), "recognised"),
    ("chunked (Llama 4)", ("chunked_causal", 7), dict(hf_padding=True), "recognised"),
    ("chunked overlay only", ("and", (("padding",), ("chunked_overlay", 5))), {}, "recognised"),
    ("or with blockwise", ("or", (("causal",), ("blockwise",))), {}, "materialised"),
    ("remapped, no packed ids", ("remap", ("causal",)), {}, "materialised"),
    ("raw document ids", ("and", (("causal",), ("packed_input",))), {}, "materialised"),
    ("bidirectional", ("and", (("bidirectional",), ("padding",))), {}, "materialised"),
]


def _fixed_inputs(n, dtype=torch.float64, **kw):
    return _inputs(n, dtype, seed=1, **{**dict(pad_kinds=("left", "right"), pads=(4, 6),
                                            doc_lengths=[[9, 6, n - 15], [n]]), **kw})


@pytest.mark.parametrize("case, spec, config, expect", _FIXED, ids=[c[0] for c in _FIXED])
def test_fixed_compositions(case, spec, config, expect):
    n = 23
    record = _run_case(Composed(spec, **config), [(n, _fixed_inputs(n))])
    assert len(record[expect]) == 1, (case, record)


# -- regressions: bugs this file found -------------------------------------------------------------

def _compiled_vs_eager(module, inputs):
    torch._dynamo.reset()
    compiled = torch.compile(module, backend="burst", options=OPTIONS, fullgraph=True)
    with torch.no_grad():
        return compiled(*inputs), module(*inputs)


def test_vmap_built_mask_compiles():
    """Regression: dead-code removal once erased Dynamo's vmap nesting calls around a vmapped mask
    (create_causal_mask with or/and_mask_function): BackendCompilerFailed."""
    got, want = _compiled_vs_eager(Composed(("and", (("causal",), ("padding",))), use_vmap=True),
                                   _fixed_inputs(23))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_unrecognised_additive_mask_with_averaging_rows():
    """Regression: an additive where(M, 0, finfo.min) mask the pass does not recognise converted through
    the row form and was refused at run time when a row hid every key; it now runs as the eager formula."""
    inputs = _fixed_inputs(23, torch.float32)
    inputs[4].fill_(-1)  # no blockwise group: the or adds nothing, left-padded queries see no key
    got, want = _compiled_vs_eager(Composed(("or", (("causal",), ("blockwise",))), builder="eager",
                                            hf_padding=True), inputs)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_float64_additive_mask_with_averaging_rows():
    """Regression: the eager formula's softmax ran in float32, so finfo(float64).min became -inf and
    fully hidden rows NaN instead of the average."""
    got, want = _compiled_vs_eager(Composed(("causal",), builder="eager", hf_padding=True), _fixed_inputs(23))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_mask_built_for_one_batch_row_and_broadcast():
    """Regression: a mask built for batch 1 and broadcast was described as key padding with the whole
    [B, N] tensor (each row its own padding; error ~1.9 before the first-call proof). The gather's batch
    length is now checked."""
    n = 23
    _run_case(Composed(("causal",), hf_padding=True, mask_batch=1),
              [(n, _fixed_inputs(n, pad_kinds=("none", "left"), pads=(0, 6)))])


def test_mask_built_for_one_batch_row_stays_exact():
    """Bug 4's output, whichever of the pass and the first-call proof handles it."""
    got, want = _compiled_vs_eager(Composed(("causal",), hf_padding=True, mask_batch=1),
                                   _fixed_inputs(23, pad_kinds=("none", "left"), pads=(0, 6)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_padding_mask_longer_than_the_sequence():
    """Regression: a [B, M] padding mask with M > N (eager reads its first N columns) was recognised
    without a length check and refused at run time."""
    qkv, attention_mask, *rest = _fixed_inputs(23)
    longer = torch.cat([attention_mask, torch.zeros(B, 3, dtype=torch.bool)], dim=1)
    got, want = _compiled_vs_eager(Composed(("and", (("causal",), ("padding",)))), (qkv, longer, *rest))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
