"""FFN neurons and attention heads removed whole (`pruning.mask_type: neurons | heads`, issue 20) through the public
one-shot API."""

import pytest
import torch

from fls_hf import load_recipe, oneshot, sparsity_report
from fls_hf.errors import RecipeError
from fls_hf.model.structures import attention_blocks, ffn_blocks, live_groups, shrink, shrink_ffn
from fls_hf.pruning.pruner import Pruner

from helpers import causal_batches, tiny_bert, tiny_llama, token_batches


def recipe(method="kfac", share=0.5, mask_type="neurons", **pruning):
    return {
        "pruning": {"method": method, "mask_type": mask_type, "final_sparsity": share, **pruning},
        "curvature": {"num_examples": 16, "num_batches": 4} if method == "kfac" else {},
    }


def removed(model) -> dict[str, int]:
    return {b.prefix: int((~live_groups(model, b)).sum()) for b in ffn_blocks(model)}


def output_error(model, dense, batches) -> float:
    """Mean squared change of the logits against the dense model on the calibration batches."""
    model.eval(), dense.eval()
    with torch.no_grad():
        return sum(
            float((model(**b).logits - dense(**b).logits).square().mean()) for b in batches for b in [_inputs(b)]
        )


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def real_token_outputs(model, name: str, batches) -> torch.Tensor:
    """Module `name`'s outputs at the batches' real tokens (those K-FAC's statistics count), (tokens, features)."""
    rows = []
    hook = model.get_submodule(name).register_forward_hook(lambda module, args, out: rows.append(out))
    model.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                model(**_inputs(batch))
                rows[-1] = rows[-1][batch["attention_mask"].bool()]
    finally:
        hook.remove()
    return torch.cat(rows)


@pytest.mark.parametrize("global_sparsity", [True, False])
def test_oneshot_removes_the_share_of_neurons_and_their_producer_rows(global_sparsity):
    model = tiny_bert(intermediate_size=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    oneshot(model, token_batches(), recipe(share=0.5, global_sparsity=global_sparsity))
    counts = removed(model)
    assert sum(counts.values()) == 40
    if not global_sparsity:
        assert set(counts.values()) == {20}
    for block in ffn_blocks(model):
        gone = ~live_groups(model, block)
        for producer in block.producers:  # the neuron's input rows are zero too (its bias is left: unread)
            assert bool((model.get_submodule(producer).weight[gone] == 0).all())
            assert bool((model.get_submodule(producer).weight[~gone] != 0).any(dim=1).all())


def test_group_obs_changes_the_outputs_less_than_column_magnitude():
    settings = dict(intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batches = token_batches(n_batches=4, batch_size=8)
    dense = tiny_bert(**settings)
    errors = {}
    for method in ("kfac", "magnitude"):
        model = tiny_bert(**settings)
        oneshot(model, batches, recipe(method, share=0.5))
        errors[method] = output_error(model, dense, batches)
    assert errors["kfac"] < 0.5 * errors["magnitude"]


def test_group_obs_moves_the_removed_neurons_mean_into_the_down_projections_bias():
    """The first FFN's inputs do not depend on its own neurons: over the calibration tokens its output keeps the dense
    mean exactly (δb = −δW μ), while each token's output changes; the up projection's bias is left alone."""
    settings = dict(intermediate_size=48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batches = token_batches(n_batches=4, batch_size=8)
    dense, model = tiny_bert(**settings), tiny_bert(**settings)
    oneshot(model, batches, recipe("kfac", share=0.5, global_sparsity=False))
    # over the 16 examples of the statistics pass
    consumer, producer = "bert.encoder.layer.0.output.dense", "bert.encoder.layer.0.intermediate.dense"
    outputs = {k: real_token_outputs(net, consumer, batches[:2]) for k, net in (("dense", dense), ("pruned", model))}
    assert not torch.equal(model.get_submodule(consumer).bias, dense.get_submodule(consumer).bias)
    torch.testing.assert_close(model.get_submodule(producer).bias, dense.get_submodule(producer).bias)
    torch.testing.assert_close(outputs["pruned"].mean(0), outputs["dense"].mean(0), rtol=0, atol=1e-5)
    assert float((outputs["pruned"] - outputs["dense"]).abs().max()) > 0.05 * float(outputs["dense"].abs().max())


def test_uniform_llama_shrinks_to_half_width_with_the_same_logits(tmp_path):
    model = tiny_llama(intermediate_size=32)
    batches = causal_batches()
    oneshot(model, batches, recipe(share=0.5, global_sparsity=False))
    model.eval()
    with torch.no_grad():
        masked = model(**_inputs(batches[0])).logits
    assert shrink_ffn(model)["intermediate_size"] == 16
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(batches[0])).logits, masked, rtol=0, atol=1e-5)


def test_a_gradual_schedule_keeps_earlier_neurons_removed():
    model = tiny_bert(intermediate_size=40)
    pruner = Pruner(model, recipe(share=0.6))
    pruner.prune_to(model, 0.3, token_batches())
    first = {b.prefix: ~live_groups(model, b) for b in ffn_blocks(model)}
    assert sum(int(g.sum()) for g in first.values()) == 24
    pruner.prune_to(model, 0.6, token_batches(seed=1))
    for block in ffn_blocks(model):
        assert bool((~live_groups(model, block))[first[block.prefix]].all())
    assert sum(removed(model).values()) == 48


def test_neurons_need_a_supported_method_and_model():
    with pytest.raises(RecipeError, match="`pruning.method`.*expected one of kfac, magnitude"):
        load_recipe(recipe("diagonal_fisher"))
    from helpers import MLP

    with pytest.raises(RecipeError, match="has no neurons block fls_hf knows"):
        Pruner(MLP(), recipe())


def test_taylor_importance_is_the_batch_mean_of_squared_gradient_times_weight():
    model = tiny_bert(intermediate_size=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batches = token_batches(n_batches=3)
    pruner = Pruner(model, recipe("taylor"))
    pruner.provider.ready(model, batches)
    consumer = ffn_blocks(model)[1].consumer
    weight = model.get_submodule(consumer).weight
    expected = torch.zeros(40, dtype=torch.float64)
    model.eval()
    for batch in batches:
        model.zero_grad()
        model(**batch).loss.backward()  # the mean cross-entropy of the batch: the same loss
        expected += (weight.grad * weight.detach()).double().sum(0).square()
    torch.testing.assert_close(pruner.provider.group_importance(consumer, 1), expected / 3, rtol=1e-5, atol=1e-12)
    adopted = Pruner(model, recipe("taylor"))  # the state (per-batch column sums) carries the importance
    adopted.adopt_curvature(pruner.provider.state_dict())
    assert torch.equal(adopted.provider.group_importance(consumer, 4), pruner.provider.group_importance(consumer, 4))
    oneshot(model, batches, recipe("taylor", share=0.5, global_sparsity=False))
    assert set(removed(model).values()) == {20}


def test_taylor_ranks_structures_only():
    with pytest.raises(RecipeError, match="ranks structures only"):
        load_recipe({"pruning": {"method": "taylor", "final_sparsity": 0.5}})


def test_first_order_takes_the_mean_data_gradient_and_changes_which_neurons_go():
    """`curvature.first_order`: the provider's gradient is the mean loss gradient over `num_examples` examples (the
    first 12 of the list: three batches of 4), and group OBS with it removes the same share, picking other neurons."""
    settings = dict(intermediate_size=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batches = token_batches(n_batches=4)
    model = tiny_bert(**settings)
    first_order = recipe(share=0.5, global_sparsity=False)
    first_order["curvature"].update(num_examples=12, first_order=True)
    pruner = Pruner(model, first_order)
    pruner.provider.ready(model, batches)
    consumer = ffn_blocks(model)[0].consumer
    weight = model.get_submodule(consumer).weight
    model.eval()
    model.zero_grad()
    sum(model(**b).loss for b in batches[:3]).backward()
    torch.testing.assert_close(pruner.provider.mean_gradient(consumer), weight.grad / 3, rtol=1e-5, atol=1e-9)
    model.zero_grad()
    oneshot(model, batches, first_order)
    plain = tiny_bert(**settings)
    oneshot(plain, batches, recipe(share=0.5, global_sparsity=False))
    assert set(removed(model).values()) == {20} and set(removed(plain).values()) == {20}
    blocks = ffn_blocks(model)
    assert any(not torch.equal(live_groups(model, b), live_groups(plain, b)) for b in blocks)


def test_first_order_is_for_structures_and_a_statistics_pass():
    with pytest.raises(RecipeError, match="`curvature.first_order`.*mask_type: neurons"):
        load_recipe({"pruning": {"method": "kfac", "final_sparsity": 0.5}, "curvature": {"first_order": True}})
    with pytest.raises(RecipeError, match="`curvature.first_order`.*statistics: pass"):
        load_recipe(
            {
                "pruning": {"method": "kfac", "mask_type": "neurons"},
                "curvature": {"first_order": True, "statistics": "training"},
            }
        )


@pytest.mark.parametrize("method", ["kfac", "magnitude", "taylor"])
def test_llama_heads_pruned_by_kv_group_shrink_with_the_same_logits(method):
    model = tiny_llama(num_attention_heads=8, num_key_value_heads=4, head_dim=2)  # 4 groups of 2 query heads
    batches = causal_batches()
    oneshot(model, batches, recipe(method, share=0.5, mask_type="heads", global_sparsity=False))
    for block in attention_blocks(model):
        gone = ~live_groups(model, block)
        assert int(gone.sum()) == 2
        q = model.get_submodule(block.producers[0]).weight.reshape(4, 4, -1)  # (groups, 2 heads × 2 dims, hidden)
        assert bool((q[gone] == 0).all()) and bool((q[~gone] != 0).any())
    model.eval()
    with torch.no_grad():
        masked = model(**_inputs(batches[0])).logits
    assert shrink(model, "heads")["num_key_value_heads"] == 2
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(batches[0])).logits, masked, rtol=0, atol=1e-5)


def test_bert_heads_by_group_obs_beat_head_magnitude_in_output_error():
    settings = dict(hidden_size=32, num_attention_heads=8, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    batches = token_batches(n_batches=4, batch_size=8)
    dense = tiny_bert(**settings)
    errors = {}
    for method in ("kfac", "magnitude"):
        model = tiny_bert(**settings)
        oneshot(model, batches, recipe(method, share=0.5, mask_type="heads"))
        assert sum(int((~live_groups(model, b)).sum()) for b in attention_blocks(model)) == 8
        errors[method] = output_error(model, dense, batches)
    assert errors["kfac"] < errors["magnitude"]


def test_the_sparsity_report_counts_removed_groups_per_block():
    model = tiny_bert(intermediate_size=40)
    cfg = recipe("magnitude", share=0.25, global_sparsity=False)
    oneshot(model, token_batches(), cfg)
    report = sparsity_report(model, load_recipe(cfg))
    assert [(g.kind, g.groups, g.removed) for g in report.structures] == [("neurons", 40, 10)] * 2
    assert report.global_sparsity == pytest.approx(0.25)  # the blocks' weights: a share of whole rows / columns
    assert "| **all neurons** | **20 / 80** (25.00 %) |" in report.to_markdown()
    assert report.to_dict()["structures"][0]["block"] == "bert.encoder.layer.0"


def test_targets_and_ignore_choose_the_blocks_whose_groups_go():
    layer0 = "bert.encoder.layer.0"
    kept_dense = tiny_bert(intermediate_size=40)
    oneshot(kept_dense, token_batches(), recipe("magnitude", global_sparsity=False, ignore=[f"re:{layer0}\\..*"]))
    assert removed(kept_dense) == {layer0: 0, "bert.encoder.layer.1": 20}  # an ignored layer keeps its whole block
    only0 = tiny_bert(intermediate_size=40)
    oneshot(only0, token_batches(), recipe("magnitude", global_sparsity=False, targets=[f"{layer0}.output.dense"]))
    assert removed(only0) == {layer0: 20, "bert.encoder.layer.1": 0}  # one layer of a block names the block
    report = sparsity_report(only0, load_recipe(recipe("magnitude", targets=[f"{layer0}.output.dense"])))
    assert [g.block for g in report.structures] == [layer0]
    with pytest.raises(RecipeError, match=r"`pruning.targets` pattern 'classifier' names no layer of a neurons block"):
        Pruner(tiny_bert(), recipe(targets=["classifier"]))
    with pytest.raises(RecipeError, match="leave no neurons block of BertForSequenceClassification"):
        Pruner(tiny_bert(), recipe(ignore=["re:.*dense"]))


@pytest.mark.parametrize("hidden, heads", [(48, 6), (16, 8)])
def test_neurons_and_heads_in_one_run_take_their_own_shares_and_shrink_together(tmp_path, caplog, hidden, heads):
    """Llama's config wants the heads to divide hidden_size: 6 of 8 heads load at 48 wide, not at 16, where the
    shrunk model keeps 8, the removed pair as zeros, and says so."""
    from transformers import AutoModelForCausalLM

    from fls_hf import save_shrunk

    model = tiny_llama(
        hidden_size=hidden, intermediate_size=32, num_attention_heads=8, num_key_value_heads=4, head_dim=hidden // 8
    )
    batches = causal_batches()
    cfg = recipe(share=0.5, mask_type="heads + neurons", head_sparsity=0.25, global_sparsity=False)
    assert load_recipe(cfg).pruning.mask_type == "neurons+heads"
    oneshot(model, batches, cfg)
    assert set(removed(model).values()) == {16}
    assert [int((~live_groups(model, b)).sum()) for b in attention_blocks(model)] == [1, 1]  # 25 % of 4 KV groups
    report = sparsity_report(model, load_recipe(cfg))
    assert report.global_sparsity == pytest.approx(report.target)  # each block's layers lose its kind's share
    assert 0.25 < report.target < 0.5
    assert "| **all neurons** | **32 / 64**" in report.to_markdown()
    assert "| **all heads** | **2 / 8**" in report.to_markdown()
    model.eval()
    with torch.no_grad():
        masked = model(**_inputs(batches[0])).logits
    with caplog.at_level("WARNING", logger="fls_hf"):
        shrunk = save_shrunk(model, str(tmp_path))
    assert (shrunk["intermediate_size"], shrunk["num_attention_heads"]) == (16, heads)
    assert ("LlamaConfig refuses 6 heads; the shrunk model keeps 8, 2 of them" in caplog.text) == (heads == 8)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**_inputs(batches[0])).logits, masked, rtol=0, atol=1e-5)


def test_neurons_and_heads_need_the_heads_share():
    with pytest.raises(RecipeError, match="`pruning.head_sparsity` = None is required with"):
        load_recipe(recipe(mask_type="neurons+heads"))
    with pytest.raises(RecipeError, match="`pruning.head_sparsity` = 0.2 applies to `pruning.mask_type: neurons"):
        load_recipe(recipe(head_sparsity=0.2))
    with pytest.raises(RecipeError, match="`pruning.final_sparsity` = 0.0 must be > 0"):
        load_recipe(recipe(share=0.0, mask_type="neurons+heads", head_sparsity=0.2))
    with pytest.raises(RecipeError, match=r"neurons\+heads.: MLP has no neurons block fls_hf knows"):
        from helpers import MLP

        Pruner(MLP(), recipe(mask_type="neurons+heads", head_sparsity=0.2))
