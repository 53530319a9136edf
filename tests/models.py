"""Small models for the compile tests: a GPT with F.scaled_dot_product_attention (MHA or GQA) or with
nanoGPT-style hand-written attention (hand_written=True)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class SdpaAttention(nn.Module):
    def __init__(self, dim=32, heads=4, kv_heads=2, causal=True, dropout=0.0):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.causal, self.dropout = heads, kv_heads, dim // heads, causal, dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * kv_heads * self.head_dim)
        self.o = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, c = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).view(b, t, 2, self.kv_heads, self.head_dim).unbind(2)
        y = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), is_causal=self.causal,
                                           enable_gqa=self.heads != self.kv_heads,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.o(y.transpose(1, 2).reshape(b, t, c))


class HandWrittenAttention(nn.Module):
    """nanoGPT's CausalSelfAttention without flash: q @ k^T / sqrt(d), a tril buffer, softmax, dropout."""

    def __init__(self, dim=32, heads=4, block_size=128, dropout=0.0, **_):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.c_attn = nn.Linear(dim, 3 * dim)
        self.c_proj = nn.Linear(dim, dim)
        self.attn_dropout = nn.Dropout(dropout)
        self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, self.head_dim).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        att = self.attn_dropout(att)
        y = att @ v
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, dim, hand_written=False, **attn):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = (HandWrittenAttention if hand_written else SdpaAttention)(dim, **attn)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CausalConv(nn.Module):
    """A causal depthwise conv1d over the sequence (Mamba/Hyena-style token mixing outside attention)."""

    def __init__(self, dim, width=3):
        super().__init__()
        self.conv = nn.Conv1d(dim, dim, width, groups=dim, padding=width - 1)

    def forward(self, x):
        return x + self.conv(x.transpose(1, 2))[..., :x.shape[1]].transpose(1, 2)


class TokenMixers(nn.Module):
    """Every spelling of bounded token mixing the halo covers (burstc.passes.windows): RWKV's token shift
    (nn.ZeroPad2d), a roll, F.pad then a dilated conv, a 'same' conv, Mamba's conv(x)[..., :N]."""

    def __init__(self, dim):
        super().__init__()
        self.shift = nn.ZeroPad2d((0, 0, 1, -1))
        self.dilated = nn.Conv1d(dim, dim, 3, dilation=2, groups=dim)
        self.same = nn.Conv1d(dim, dim, 4, padding="same")
        self.causal = nn.Conv1d(dim, dim, 4, groups=dim, padding=3)
        self.mix = nn.Parameter(torch.rand(dim))

    def forward(self, x):
        n = x.shape[1]
        y = self.mix * x + (1 - self.mix) * self.shift(x) + 0.5 * torch.roll(x, 2, 1)
        t = y.transpose(1, 2)
        t = self.dilated(F.pad(t, (4, 0))) + self.same(t) + self.causal(t)[..., :n]
        return x + F.silu(t).transpose(1, 2)


class TinyGPT(nn.Module):
    """conv=True puts a CausalConv before every block: an op that mixes tokens outside attention (mixers=True:
    TokenMixers, all the spellings); graph_break=True breaks Dynamo's graph between blocks."""

    def __init__(self, vocab=50, dim=32, layers=2, conv=False, graph_break=False, mixers=False, **attn):
        super().__init__()
        self.graph_break = graph_break
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(256, dim)
        self.blocks = nn.ModuleList(Block(dim, **attn) for _ in range(layers))
        mixer = TokenMixers if mixers else CausalConv if conv else lambda dim: nn.Identity()
        self.convs = nn.ModuleList(mixer(dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx):
        x = self.emb(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        half = len(self.blocks) // 2
        x = self.run_blocks(x, 0, half)
        if self.graph_break:
            torch._dynamo.graph_break()
        return self.head(self.run_blocks(x, half, len(self.blocks)))

    def run_blocks(self, x, start, stop):
        for conv, block in zip(self.convs[start:stop], self.blocks[start:stop]):
            x = block(conv(x))
        return x


class Checkpointed(nn.Module):
    """inner under torch.utils.checkpoint (use_reentrant as given; context_fn: a selective policy's)."""

    def __init__(self, inner: nn.Module, use_reentrant=False, context_fn=None):
        super().__init__()
        self.inner, self.use_reentrant, self.context_fn = inner, use_reentrant, context_fn

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        if self.context_fn is None:
            return checkpoint(self.inner, x, use_reentrant=self.use_reentrant)
        return checkpoint(self.inner, x, use_reentrant=self.use_reentrant, context_fn=self.context_fn)


def loss_and_grads(model, idx):
    """Next-token loss and every parameter's gradient."""
    model.zero_grad()
    logits = model(idx)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1))
    loss.backward()
    return loss.detach(), {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}


def hf_training_step(model, ids, labels, **kwargs):
    """One step of an HF causal LM: (loss, logits on real tokens (padded query rows zeroed: nobody reads
    them), every parameter's gradient)."""
    model.zero_grad()
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    logits = out.logits.detach()
    if "attention_mask" in kwargs:
        logits = logits * kwargs["attention_mask"][:, :, None]
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), logits, grads
