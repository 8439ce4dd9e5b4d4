"""Peer comparison: grouped sigmoid routing against transformers' DeepSeek-V3 router."""

import pytest
import torch

from frontiers_fast.ops import moe

from ..helpers import assert_close

ds = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
DeepseekV3Config = pytest.importorskip("transformers").DeepseekV3Config


@pytest.mark.parametrize("norm", [True, False])
def test_grouped_topk_matches_deepseek_v3_router(norm):
    H, E, n_group, topk_group, k, T = 16, 32, 8, 3, 6, 41
    config = DeepseekV3Config(
        hidden_size=H, n_routed_experts=E, num_experts_per_tok=k, n_group=n_group, topk_group=topk_group,
        norm_topk_prob=norm, routed_scaling_factor=2.5,
    )  # fmt: skip
    router = ds.DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, H))
        router.e_score_correction_bias.copy_(torch.randn(E) * 0.5)
    x = torch.randn(T, H)
    logits, want_w, want_ids = router(x)
    w, ids = moe.moe_route(
        logits, k, "sigmoid", norm, router.e_score_correction_bias, n_group, topk_group, scaling=2.5
    )
    # transformers returns its picks unsorted: compare as sets, weights matched by expert.
    order_ours, order_theirs = ids.long().argsort(-1), want_ids.argsort(-1)
    assert torch.equal(ids.long().gather(1, order_ours), want_ids.gather(1, order_theirs))
    assert_close(w.gather(1, order_ours), want_w.gather(1, order_theirs))
    # ours also lists them best-first by the biased score
    biased = logits.sigmoid() + router.e_score_correction_bias
    chosen = biased.gather(1, ids.long())
    assert (chosen[:, :-1] >= chosen[:, 1:]).all()
