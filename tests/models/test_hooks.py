"""Hook names and activation capture on tiny random GPT-NeoX models (CPU, a few seconds)."""

from __future__ import annotations

import pytest
import torch

from crosslib.config import ParameterError
from crosslib.models.hooks import (
    HOOK_KINDS,
    HookPoint,
    capture,
    capture_all,
    hook_names,
    parse_hook,
    record_hooks,
    replace_hook,
    validate_hook,
)

N_LAYERS = 3


def tiny_neox(parallel: bool = True, seed: int = 0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=64,
        hidden_size=32,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=16,
        rotary_pct=0.25,
        use_parallel_residual=parallel,
    )
    model = GPTNeoXForCausalLM(config).eval()
    # Random init has zero biases and unit layer norms; perturb them so that the tests can
    # tell apart activations that differ only by a bias or a norm.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name or "layernorm" in name or "layer_norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=[True, False], ids=["parallel", "sequential"])
def model(request):
    return tiny_neox(parallel=request.param)


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(1))


def module_outputs(model, ids):
    """attention / MLP outputs and layer inputs captured with plain forward hooks on the modules."""
    got: dict[str, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(model.gpt_neox.layers):
        handles.append(layer.attention.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"attn{i}", o[0])))
        handles.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: got.__setitem__(f"mlp{i}", o)))
        handles.append(
            layer.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, i=i: got.__setitem__(f"ln2in{i}", a[0])
            )
        )
    try:
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return out, got


def test_parse_and_names():
    assert parse_hook("blocks.2.hook_resid_post") == HookPoint(2, "resid_post")
    assert parse_hook("blocks.10.hook_mlp_out").name == "blocks.10.hook_mlp_out"
    for bad in ["blocks.2.hook_resid", "blocks.x.hook_resid_post", "resid_post", "blocks.2.hook_z", 3, ""]:
        with pytest.raises(ParameterError, match="blocks.{L}.hook_resid_post") as e:
            parse_hook(bad)
        assert "hook=" in str(e.value)


def test_validate_layer_range_and_resid_mid():
    par, seq = tiny_neox(True), tiny_neox(False)
    with pytest.raises(ParameterError, match=f"n_layers={N_LAYERS}"):
        validate_hook(f"blocks.{N_LAYERS}.hook_resid_post", par)
    with pytest.raises(ParameterError, match="parallel residual"):
        validate_hook("blocks.0.hook_resid_mid", par)
    assert validate_hook("blocks.0.hook_resid_mid", seq).kind == "resid_mid"
    assert len(hook_names(par)) == N_LAYERS * (len(HOOK_KINDS) - 1)
    assert len(hook_names(seq.config)) == N_LAYERS * len(HOOK_KINDS)
    with pytest.raises(ParameterError, match="method="):
        capture(par, "blocks.0.hook_resid_post", torch.zeros(1, 4, dtype=torch.long), method="fast")


@pytest.mark.parametrize("method", ["truncate", "stop"])
def test_capture_matches_full_forward(model, ids, method):
    out, got = module_outputs(model, ids)
    hidden = out.hidden_states
    final_ln = model.gpt_neox.final_layer_norm
    with torch.no_grad():
        for layer in range(N_LAYERS):
            pre = capture(model, f"blocks.{layer}.hook_resid_pre", ids, method=method)
            post = capture(model, f"blocks.{layer}.hook_resid_post", ids, method=method)
            torch.testing.assert_close(pre, hidden[layer], rtol=1e-5, atol=1e-5)
            if layer < N_LAYERS - 1:
                torch.testing.assert_close(post, hidden[layer + 1], rtol=1e-5, atol=1e-5)
            else:  # HF applies the final layer norm to its last hidden state
                torch.testing.assert_close(final_ln(post), hidden[layer + 1], rtol=1e-5, atol=1e-5)
                assert not torch.allclose(post, hidden[layer + 1], atol=1e-3)
            attn = capture(model, f"blocks.{layer}.hook_attn_out", ids, method=method)
            mlp = capture(model, f"blocks.{layer}.hook_mlp_out", ids, method=method)
            torch.testing.assert_close(attn, got[f"attn{layer}"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(mlp, got[f"mlp{layer}"], rtol=1e-5, atol=1e-5)
            # the pieces add up to the residual stream
            torch.testing.assert_close(post, pre + attn + mlp, rtol=1e-4, atol=1e-4)
            if not model.config.use_parallel_residual:
                mid = capture(model, f"blocks.{layer}.hook_resid_mid", ids, method=method)
                torch.testing.assert_close(mid, got[f"ln2in{layer}"], rtol=1e-5, atol=1e-5)
                torch.testing.assert_close(mid, pre + attn, rtol=1e-5, atol=1e-5)


def test_capture_all_gives_each_hooks_capture_from_one_pass(model, ids):
    """Several hooks from one forward pass, bit for bit what `capture` gives at each (the activation cache
    builds a model's layers together with it), running each layer once and nothing past the deepest."""
    hooks = hook_names(model)[:-1]  # all but the last layer's last hook: the pass must stop at that layer
    calls: list[str] = []
    handles = [layer.register_forward_hook(lambda m, a, o, i=i: calls.append(i))
               for i, layer in enumerate(model.gpt_neox.layers)]
    try:
        with torch.no_grad():
            together = capture_all(model, hooks, ids)
            assert calls == list(range(N_LAYERS)), calls
            for hook, activation in zip(hooks, together):
                assert torch.equal(activation, capture(model, hook, ids)), hook
            calls.clear()
            shallow = capture_all(model, ["blocks.0.hook_mlp_out", "blocks.0.hook_resid_pre"], ids)
            assert calls == [0] and torch.equal(shallow[1], capture(model, "blocks.0.hook_resid_pre", ids))
    finally:
        for handle in handles:
            handle.remove()


def test_truncated_forward_runs_nothing_past_the_hook(model, ids):
    calls: list[str] = []
    handles = [
        m.register_forward_hook(lambda mod, a, o, n=n: calls.append(n))
        for n, m in model.named_modules()
        if n.count(".") in (2, 3) or n in ("gpt_neox.final_layer_norm", "lm_head")
    ]
    try:
        with torch.no_grad():
            for method in ("truncate", "stop"):
                calls.clear()
                capture(model, "blocks.1.hook_resid_pre", ids, method=method)
                assert not any(c.startswith(("gpt_neox.layers.1", "gpt_neox.layers.2")) for c in calls), calls
                assert "lm_head" not in calls and "gpt_neox.final_layer_norm" not in calls
                assert any(c.startswith("gpt_neox.layers.0") for c in calls)
                calls.clear()
                capture(model, "blocks.1.hook_attn_out", ids, method=method)
                assert not any(c.startswith("gpt_neox.layers.2") for c in calls), calls
                assert "lm_head" not in calls
            if model.config.use_parallel_residual:  # the parallel MLP does not need attention
                calls.clear()
                capture(model, "blocks.1.hook_mlp_out", ids)
                assert not any(c.startswith("gpt_neox.layers.1.attention") for c in calls), calls
    finally:
        for h in handles:
            h.remove()


def test_replace_identity_keeps_logits_and_replacement_acts(model, ids):
    with torch.no_grad():
        reference = model(ids).logits
        shift = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(2))
        names = [n for n in hook_names(model) if n.startswith("blocks.1.")]
        for name in names:
            with replace_hook(model, name, lambda x: x.clone()):
                torch.testing.assert_close(model(ids).logits, reference, rtol=1e-5, atol=1e-5)
            # (adding a constant to every dimension would be invisible: layer norms remove the mean)
            with replace_hook(model, name, lambda x: x + shift):
                changed = model(ids).logits
            assert (changed - reference).abs().max() > 1e-3, name
        # hooks are removed on exit, also after an error inside the block
        with pytest.raises(ZeroDivisionError):
            with replace_hook(model, "blocks.0.hook_resid_post", lambda x: x * 0):
                1 / 0
        torch.testing.assert_close(model(ids).logits, reference)
        # replacing resid_post by a constant makes the logits independent of earlier tokens' content
        with replace_hook(model, f"blocks.{N_LAYERS - 1}.hook_resid_post", torch.zeros_like):
            assert torch.allclose(model(ids).logits[0], model(ids.flip(0)).logits[0])
        with pytest.raises(ParameterError, match="shape"):
            with replace_hook(model, "blocks.0.hook_mlp_out", lambda x: x[:, :1]):
                model(ids)


def test_replace_equals_capture_downstream(model, ids):
    """Splicing an activation in changes exactly what follows: capture after a replacement agrees."""
    with torch.no_grad():
        post0 = capture(model, "blocks.0.hook_resid_post", ids)
        shifted = post0 * 0.5
        with replace_hook(model, "blocks.0.hook_resid_post", lambda x: shifted):
            with record_hooks(model, "blocks.1.hook_resid_pre") as rec:
                model(ids)
        torch.testing.assert_close(rec["blocks.1.hook_resid_pre"], shifted)


def test_record_hooks_keeps_gradients(model, ids):
    with record_hooks(model, ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]) as acts:
        logits = model(ids).logits
        acts["blocks.0.hook_resid_post"].retain_grad()
        logits[:, -1].sum().backward()
    grad = acts["blocks.0.hook_resid_post"].grad
    assert grad is not None and grad.abs().sum() > 0
    assert set(acts) == {"blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"}
    model.zero_grad(set_to_none=True)


def test_truncated_capture_uses_no_deprecated_argument(model, ids):
    """transformers 5.40 removes `past_key_values` from create_causal_mask: capture must not pass it."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        with torch.no_grad():
            capture(model, "blocks.1.hook_resid_post", ids, method="truncate")
