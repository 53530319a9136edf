"""The planning pass's choices that depend on the graph's sites as a whole: the layout 'auto' resolves to."""
import pytest

from burstc.config import BurstConfig
from burstc.passes.find_attention import AttentionSite
from burstc.passes.plan import resolved_layout


def _site(causal, left=None, right=None, **masks):
    return AttentionSite(node=None, query=None, key=None, value=None, attn_mask=masks.pop("attn_mask", None),
                         dropout_p=0.0, is_causal=causal, scale=None, enable_gqa=False, source="",
                         window_left=left, window_right=right, **masks)


WINDOW = _site(True, 63, 0)
BIDIRECTIONAL_WINDOW = _site(False, 64, 64)
FULL = _site(False)
CAUSAL = _site(True)


@pytest.mark.parametrize("sites,layout", [
    ([WINDOW], "contiguous"),
    ([BIDIRECTIONAL_WINDOW, FULL], "contiguous"),  # ModernBERT: local and global layers, neither needs zigzag
    ([FULL], "contiguous"),
    ([WINDOW, CAUSAL], "zigzag"),  # Gemma 3, GPT-OSS: the full causal layers need zigzag's balance
    ([CAUSAL], "zigzag"),
    ([_site(None)], "zigzag"),  # causality decided at run time: it may be causal
    ([_site(False, attn_mask="m")], "zigzag"),  # a mask over the whole sequence may be unbalanced anywhere
    ([_site(False, document_ids="d")], "zigzag"),
    ([_site(False, key_padding="p")], "zigzag"),
    ([_site(False, mask_mod="m")], "zigzag"),
    ([_site(False, proof="p")], "zigzag"),
    ([_site(False, 8, None)], "zigzag"),  # a window open to the right reaches the whole sequence
    ([], "zigzag"),
])
def test_auto_layout_is_zigzag_only_where_some_site_needs_its_balance(sites, layout):
    assert resolved_layout(BurstConfig(), sites) == layout
    assert resolved_layout(BurstConfig(layout="striped"), sites) == "striped"
