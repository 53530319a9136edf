"""The long-context training recipe under sequence mode on 2 ranks, against single-device eager on the same
weights and batch: activation checkpointing (HF's gradient_checkpointing_enable, torch.utils.checkpoint,
checkpoint_wrapper) exactly, with the ring run once per layer per step (the recompute does not run it
again); autocast (around the compiled call or inside it, bf16 and fp16) as accurately as eager autocast."""
import contextlib
import copy
import functools
import pytest
import torch
from torch._dynamo.utils import counters

from burstc.launch import run_ranks
from burstc.runtime.stats import comm_stats
from torch.utils.checkpoint import create_selective_checkpoint_contexts

from tests.models import Checkpointed, TinyGPT, hf_training_step, loss_and_grads

N = 64


def _llama():
    """The tiny HF Llama (sdpa) of these tests, from seed 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(config)


def _hf_llama(use_reentrant):
    model = _llama()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    return model


def _tiny_gpt(how):
    model = TinyGPT(vocab=128, dim=32, layers=2)
    for i, block in enumerate(model.blocks):
        if how == "checkpoint_wrapper":
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            model.blocks[i] = checkpoint_wrapper(block)
        elif how == "selective":  # save the matmuls' outputs, recompute the rest
            policy = [torch.ops.aten.mm.default, torch.ops.aten.addmm.default]
            model.blocks[i] = Checkpointed(block, context_fn=functools.partial(create_selective_checkpoint_contexts,
                                                                               policy))
        elif how != "none":
            model.blocks[i] = Checkpointed(block, use_reentrant=how == "reentrant")
    return model


def _case(name):
    """(model, step) for one recipe: step(m) -> (loss, logits or None, gradients)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, N), generator=torch.Generator().manual_seed(1))
    if name.startswith("hf"):
        model = _hf_llama(use_reentrant=name == "hf_reentrant")
        model.train()
        return model, lambda m: hf_training_step(m, ids, ids)
    model = _tiny_gpt(name.removeprefix("tiny_"))
    return model, lambda m: _without_logits(loss_and_grads(m, ids))


def _without_logits(loss_grads):
    loss, grads = loss_grads
    return loss, None, grads


def _relative(got, want):
    return ((got - want).norm() / want.norm().clamp_min(1e-12)).item()


def _compare(rank, world_size, names):
    results = []
    for name in names:
        model, step = _case(name)
        want_loss, want_out, want = step(model)
        counters.clear()
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="burst")
        got_loss, got_out, got = step(compiled)
        with comm_stats() as stats:  # a steady step
            step(compiled)
        assert set(got) == set(want), set(got) ^ set(want)
        results.append(dict(
            name=name, loss_err=abs(got_loss - want_loss).item(),
            out_err=0.0 if want_out is None else _relative(got_out, want_out),
            grad_err=max(_relative(got[n], want[n]) for n in want), counters=dict(counters["burst"]),
            forward_calls=stats.forward_calls, backward_calls=stats.backward_calls))
    return results


@pytest.mark.parametrize("names", [("hf_non_reentrant", "hf_reentrant"),
                                   ("tiny_function", "tiny_reentrant", "tiny_checkpoint_wrapper", "tiny_selective")])
def test_activation_checkpointing_is_sequence_parallel_and_exact(names):
    if names[0].startswith("hf"):
        pytest.importorskip("transformers")
    for rank_results in run_ranks(2, _compare, names, timeout_s=900):
        for r in rank_results:
            assert r["loss_err"] <= 1e-5 and r["out_err"] <= 1e-4 and r["grad_err"] <= 1e-4, r
            c = r["counters"]
            assert c.get("sites_converted") == 2 and not c.get("sites_left"), r
            assert c.get("seq_graphs", 0) >= 1 and not c.get("seq_fallbacks"), r
            assert r["forward_calls"] == 2 and r["backward_calls"] == 2, r  # one ring per layer each way


def _saved_bytes(model, ids) -> int:
    """Bytes the forward of a compiled step saves for its backward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids).sum()
    loss.backward()
    return total


def test_checkpointing_lowers_what_the_compiled_step_saves():
    """One process: checkpointing saves less than no checkpointing, a selective policy that saves the
    matmuls saves in between (the policy is asked), and all three are exact."""
    ids = torch.randint(0, 128, (2, 128), generator=torch.Generator().manual_seed(1))
    saved = {}
    for how in ("none", "selective", "function"):
        torch.manual_seed(0)
        model = _tiny_gpt(how)
        want_loss, want = loss_and_grads(model, ids)
        torch._dynamo.reset()
        compiled = torch.compile(copy.deepcopy(model), backend="burst")
        got_loss, got = loss_and_grads(compiled, ids)
        assert abs(got_loss - want_loss) <= 1e-5 and max(_relative(got[n], want[n]) for n in want) <= 1e-4, how
        saved[how] = _saved_bytes(compiled, ids)
    assert saved["function"] < saved["selective"] < saved["none"], saved


class _InGraphAutocast(torch.nn.Module):
    """inner under an autocast entered inside the compiled code (enter/exit nodes in Dynamo's graph)."""

    def __init__(self, inner, dtype):
        super().__init__()
        self.inner, self.dtype = inner, dtype

    def forward(self, x):
        with torch.autocast("cpu", self.dtype):
            return self.inner(x)


def _autocast_case(name):
    """(model, step, autocast context or None): HF Llama under an ambient autocast, or TinyGPT entering it."""
    dtype = torch.float16 if "fp16" in name else torch.bfloat16
    torch.manual_seed(0)
    ids = torch.randint(0, 128, (2, N), generator=torch.Generator().manual_seed(1))
    if name.startswith("tiny"):
        model = _InGraphAutocast(TinyGPT(vocab=128, dim=32, layers=2), dtype)
        return model, lambda m: _without_logits(loss_and_grads(m, ids)), None
    model = _hf_llama(use_reentrant=False)
    if "checkpoint" not in name:
        model.gradient_checkpointing_disable()
    model.train()
    return model, lambda m: hf_training_step(m, ids, ids), functools.partial(torch.autocast, "cpu", dtype)


def _autocast_errors(rank, world_size, names):
    """Per case: each parameter's gradient error against fp32 eager, of eager autocast and of burst under
    the same autocast; the logits' dtypes of both."""
    results = []
    for name in names:
        model, step, ambient = _autocast_case(name)
        ambient = ambient or contextlib.nullcontext
        reference = copy.deepcopy(model)
        if isinstance(reference, _InGraphAutocast):
            reference = reference.inner  # fp32: the same weights without the autocast
        _, _, fp32 = step(reference)
        with ambient():
            _, eager_out, eager = step(copy.deepcopy(model))
        counters.clear()
        torch._dynamo.reset()
        with ambient():
            _, burst_out, burst = step(torch.compile(copy.deepcopy(model), backend="burst"))
        eager, burst = ({n.removeprefix("inner."): g for n, g in grads.items()} for grads in (eager, burst))
        results.append(dict(
            name=name, counters=dict(counters["burst"]),
            dtypes=(None, None) if eager_out is None else (eager_out.dtype, burst_out.dtype),
            eager_err={n: _relative(eager[n], fp32[n]) for n in fp32},
            burst_err={n: _relative(burst[n], fp32[n]) for n in fp32}))
    return results


def test_autocast_sites_convert_and_are_as_accurate_as_eager_autocast():
    """RoPE promotes q and k to fp32 while v stays bf16: eager SDPA under autocast casts all three. Each
    gradient's error against fp32 must be within 1.5x of eager autocast's own."""
    pytest.importorskip("transformers")
    names = ("hf_bf16", "hf_fp16", "hf_checkpoint_bf16", "tiny_in_graph_bf16")
    for rank_results in run_ranks(2, _autocast_errors, names, timeout_s=900):
        for r in rank_results:
            c = r["counters"]
            assert c.get("sites_converted") == 2 and not c.get("sites_left"), r
            assert c.get("seq_graphs", 0) >= 1 and not c.get("seq_fallbacks"), r
            assert r["dtypes"][0] == r["dtypes"][1], r  # burst ran under the same autocast
            worst = max(r["burst_err"][n] / max(r["eager_err"][n], 1e-7) for n in r["eager_err"])
            assert worst <= 1.5, (worst, r)
            if r["name"].startswith("hf"):
                assert c.get("autocast_sites") == 2, r  # the RoPE'd q, k and the bf16 v disagreed


def _boundaries(rank, world_size, hows):
    """Per way of compiling TinyGPT: errors against eager, the bytes a steady step gathered outside the
    graphs (eager code reading a SequenceShard), and the counters."""
    results = []
    ids = torch.randint(0, 128, (2, N), generator=torch.Generator().manual_seed(1))
    for how in hows:
        torch.manual_seed(0)
        model = TinyGPT(vocab=128, dim=32, layers=2, graph_break=how == "graph_break")
        want_loss, want = loss_and_grads(model, ids)
        counters.clear()
        torch._dynamo.reset()
        compiled = copy.deepcopy(model)
        if how == "per_block":  # as torchtitan compiles: each block on its own, the rest eager
            for block in compiled.blocks:
                block.compile(backend="burst")
        elif how == "mixed":  # the second block is not partitioned: the shard it receives is gathered
            compiled.blocks[0].compile(backend="burst")
            compiled.blocks[1].compile(backend="burst", options={"parallel": "attention"})
        else:
            compiled = torch.compile(compiled, backend="burst")
        got_loss, got = loss_and_grads(compiled, ids)
        with comm_stats() as stats:
            loss_and_grads(compiled, ids)
        results.append(dict(how=how, loss_err=abs(got_loss - want_loss).item(), counters=dict(counters["burst"]),
                            grad_err=max(_relative(got[n.removeprefix("_orig_mod.")], want[n]) for n in want),
                            gathered=stats.gathered_bytes))
    return results


def test_shards_cross_graph_boundaries_without_gathers():
    """A graph break between the blocks, or each block compiled on its own: the hidden states pass from
    graph to graph as this rank's rows. The one gather of a step is where eager code reads a graph's
    output: the logits for the hand-written loss (whole model, graph break), the last block's output for
    the eager head (per block), or the input of a block compiled attention-parallel (mixed)."""
    logits, hidden = 2 * N * 128 * 4, 2 * N * 32 * 4
    for rank_results in run_ranks(2, _boundaries, ("graph_break", "per_block", "mixed"), timeout_s=900):
        for r in rank_results:
            assert r["loss_err"] <= 1e-5 and r["grad_err"] <= 1e-4, r
            c = r["counters"]
            assert c.get("sites_converted") == 2 and not c.get("seq_fallbacks"), r
            assert c.get("seq_graphs") == (1 if r["how"] == "mixed" else 2), r
            assert r["gathered"] == (logits if r["how"] == "graph_break" else hidden), r


def _loss_only(rank, world_size):
    model = _llama()
    ids = torch.randint(0, 128, (2, N), generator=torch.Generator().manual_seed(1))
    compiled = torch.compile(copy.deepcopy(model), backend="burst")
    compiled(ids, labels=ids).loss.backward()
    with comm_stats() as stats:
        out = compiled(ids, labels=ids)
        out.loss.backward()
        untouched = stats.gathered_bytes
        logits_err = (out.logits - model(ids).logits).abs().max().item()  # reading them gathers them, exactly
    return untouched, stats.gathered_bytes, logits_err


def test_a_loop_that_reads_only_the_loss_gathers_nothing():
    pytest.importorskip("transformers")
    for untouched, after_read, logits_err in run_ranks(2, _loss_only, timeout_s=900):
        assert untouched == 0 and after_read == 2 * N * 128 * 4 and logits_err <= 1e-5, (untouched, after_read)


def _fsdp2(rank, world_size, data_degree, recipe=False):
    """HF Llama under FSDP2 (each layer, then the model) over the flattened data x sequence mesh, compiled
    whole with burst over the sequence ranks; against one device on the global batch. recipe: with HF's
    checkpointing and bf16 autocast too (then eager autocast's own gradients are returned beside)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = _llama()
    ids = torch.randint(0, 128, (2 * data_degree, N), generator=torch.Generator().manual_seed(1))
    ambient = functools.partial(torch.autocast, "cpu", torch.bfloat16) if recipe else contextlib.nullcontext

    def one_device(context):
        reference = copy.deepcopy(model)
        with context():
            reference(ids, labels=ids, use_cache=False).loss.backward()
        return {n: p.grad for n, p in reference.named_parameters()}
    fp32, eager = one_device(contextlib.nullcontext), one_device(ambient)
    if recipe:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    mesh = init_device_mesh("cpu", (data_degree, world_size // data_degree), mesh_dim_names=("dp", "cp"))
    shard_mesh = mesh["dp", "cp"]._flatten("dp_cp") if data_degree > 1 else mesh["cp"]
    for layer in model.model.layers:
        fully_shard(layer, mesh=shard_mesh)
    fully_shard(model, mesh=shard_mesh)
    replica = mesh["dp"].get_local_rank()
    batch = ids[2 * replica: 2 * replica + 2]
    counters.clear()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="burst", options={"group": mesh["cp"].get_group()})
    with ambient():
        compiled(batch, labels=batch, use_cache=False).loss.backward()
    model.zero_grad()
    with comm_stats() as stats, ambient():  # a steady step
        compiled(batch, labels=batch, use_cache=False).loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.full_tensor() for n, p in model.named_parameters()}
    return dict(burst_err={n: _relative(grads[n], fp32[n]) for n in fp32},
                eager_err={n: _relative(eager[n], fp32[n]) for n in fp32}, counters=dict(counters["burst"]),
                gathered=stats.gathered_bytes, all_reduced=stats.all_reduce_bytes)


@pytest.mark.parametrize("world_size,data_degree", [(2, 1), (4, 2)])
def test_fsdp2_leaves_the_gradient_sum_to_fsdp_and_passes_shards_between_layers(world_size, data_degree):
    """FSDP's hooks break the graph at every layer: the hidden states cross as shards (nothing gathered), and
    FSDP's reduce-scatter over the data x sequence ranks sums the gradients, so burst all-reduces only the
    loss (8 bytes: its sum and count), not the 20 parameters' gradients."""
    pytest.importorskip("transformers")
    for r in run_ranks(world_size, _fsdp2, data_degree, timeout_s=900):
        assert max(r["burst_err"].values()) <= 1e-5, r
        _check_fsdp2(r)


def _check_fsdp2(r):
    c = r["counters"]
    assert c.get("sites_converted") == 2 and not c.get("sites_left"), r
    assert c.get("seq_graphs", 0) >= 3 and not c.get("seq_fallbacks"), r
    assert c.get("seq_fsdp_params") == 20 and not c.get("seq_grad_sum_inputs"), r
    assert r["gathered"] == 0 and r["all_reduced"] == 8, r


def test_the_whole_recipe_checkpointing_autocast_fsdp2():
    """HF checkpointing + bf16 autocast + FSDP2 + burst on 2 ranks: every gradient within 1.5x of eager
    autocast's own error against fp32 on one device, nothing gathered, no gradient all-reduce."""
    pytest.importorskip("transformers")
    for r in run_ranks(2, _fsdp2, 1, True, timeout_s=900):
        worst = max(r["burst_err"][n] / max(r["eager_err"][n], 1e-7) for n in r["eager_err"])
        assert worst <= 1.5, (worst, r)
        _check_fsdp2(r)


def _example(rank, world_size):
    from examples.train_recipe import parse_args, train

    return train(rank, world_size, parse_args(["--steps", "2", "--seq-len", "256", "--hidden", "64", "--heads", "4"]))


def test_the_recipe_example_trains_like_one_device():
    pytest.importorskip("transformers")
    steps = run_ranks(2, _example, timeout_s=900)[0]
    for s in steps:  # bf16 autocast on both sides, different orders of summation
        assert abs(s["loss"] - s["one_device_loss"]) <= 2e-3 and s["gathered"] == 0 and s["all_reduced"] == 8, s
