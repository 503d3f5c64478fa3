"""The crosscoder module: configs, the JumpReLU straight-through estimator, the fused kernel, invariances,
per-snapshot SAEs and save/load. Tiny shapes; runs in a few seconds."""

from __future__ import annotations

import math
import shutil

import pytest
import torch

from crosslib.artifacts import ArtifactError
from crosslib.config import ParameterError
from crosslib.dictionaries import kernels as kernel_module
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig, WEIGHTS_FILE, CONFIG_FILE
from crosslib.dictionaries.kernels import ActivePattern, JumpReLU, JumpReLUTanh, KernelOptions


KERNEL_VARIANTS = [KernelOptions(), KernelOptions(fused=False), KernelOptions(compiled=True)]


def _model(S=3, d=8, F=16, seed=1, kernels=KernelOptions(), **kw) -> Crosscoder:
    """A model with varied decoder norms, thresholds and biases, so gates open and close."""
    cfg = CrosscoderConfig(n_snapshots=S, d_model=d, dict_size=F, decoder_init_norm=0.5, **kw)
    m = Crosscoder(cfg, seed=seed, kernels=kernels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.W_D.mul_(torch.rand(S, F, 1, generator=g) * 2)
        m.log_threshold.copy_(torch.rand(m.log_threshold.shape, generator=g) * 3 - 2.5)
        m.b_E.copy_(torch.randn(m.b_E.shape, generator=g) * 0.3)
        m.b_D.copy_(torch.randn(m.b_D.shape, generator=g) * 0.3)
    return m


def _loss_and_grads(m: Crosscoder, x: torch.Tensor, *, sparsity_coefficient: float = 0.7, bf16: bool = False):
    """One forward and backward pass with the model's current kernels: its output and every parameter's gradient."""
    m.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        out = m(x, sparsity_coefficient=sparsity_coefficient)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in m.named_parameters()}


# ----------------------------------------------------------------------------------- configs

@pytest.mark.parametrize("field, value, names", [
    ("activation", "gelu", ["activation", "jumprelu", "relu", "topk"]),
    ("sparsity", "l2", ["sparsity", "tanh-quad", "l1"]),
    ("dict_size", 0, ["dict_size"]),
    ("dict_size", -5, ["dict_size"]),
    ("d_model", 2.5, ["d_model"]),
    ("bandwidth", 0.0, ["bandwidth"]),
    ("decoder_init_norm", "grid", ["decoder_init_norm", "search"]),
])
def test_bad_config_names_the_parameter(field, value, names):
    kwargs = dict(n_snapshots=2, d_model=4, dict_size=8)
    kwargs[field] = value
    with pytest.raises(ParameterError) as e:
        CrosscoderConfig(**kwargs)
    for name in names:
        assert name in str(e.value)


def test_topk_k_must_fit_the_dictionary():
    with pytest.raises(ParameterError, match="k="):
        CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=8, activation="topk", k=9)


def test_config_round_trip_and_unknown_key():
    cfg = CrosscoderConfig(n_snapshots=2, d_model=4, dict_size=8, activation="relu", sparsity="l1")
    assert CrosscoderConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ParameterError, match="dict_sz"):
        CrosscoderConfig.from_dict({**cfg.to_dict(), "dict_sz": 3})


def test_input_of_the_wrong_shape_is_refused():
    m = _model()
    with pytest.raises(ParameterError, match="n_snapshots=3"):
        m(torch.randn(5, 2, 8))
    with pytest.raises(ParameterError, match="d_model=8"):
        m(torch.randn(5, 3, 7))


# ----------------------------------------------------------------------------------- the gate

def test_threshold_ste_gradient_matches_its_definition():
    """∂f/∂t = −θ²/(ε‖W_D‖)·1[|z−θ| < ε/2, z > 0] with z = h‖W_D‖, θ = e^t; ∂f/∂h = H(z−θ); nothing to ‖W_D‖."""
    g = torch.Generator().manual_seed(0)
    G, S, F, B, eps = 1, 3, 7, 50, 1.5
    h = (torch.randn(G, F, B, generator=g) * 2).requires_grad_()
    norms = (torch.rand(G, S, F, generator=g) + 0.2).requires_grad_()
    t = (torch.rand(G, F, generator=g) - 0.5).requires_grad_()
    w = torch.randn(G, S, F, B, generator=g)  # L = Σ w·f, so ∂L/∂f = w
    f = JumpReLU.apply(h, norms, t, eps)
    (f * w).sum().backward()

    theta = t.detach().exp()[:, None, :, None]
    z = h.detach()[:, None] * norms.detach()[..., None]
    window = ((z - theta).abs() < eps / 2) & (z > 0)
    expected_t = (w * torch.where(window, -theta ** 2 / (eps * norms.detach()[..., None]), 0.0)).sum((1, 3))
    expected_h = (w * (z > theta)).sum(1)
    assert torch.allclose(f.detach(), torch.where(z > theta, h.detach()[:, None], 0.0))
    assert window.any() and (~window).any()  # the test exercises both sides of the window
    assert torch.allclose(t.grad, expected_t, atol=1e-6)
    assert torch.allclose(h.grad, expected_h, atol=1e-6)
    assert norms.grad is None or torch.count_nonzero(norms.grad) == 0

    # the fused kernel uses the same estimator (tanh_sum's gradient set to zero)
    h2, n2, t2 = (v.detach().clone().requires_grad_() for v in (h, norms, t))
    f2, tanh_sum, active = JumpReLUTanh.apply(h2, torch.zeros(G, F), n2, t2, eps, 4.0, False, None)
    (f2 * w).sum().backward()
    assert torch.equal(f2, f.detach())
    assert torch.equal(active, (z > theta).sum(3, dtype=torch.int32))
    assert torch.allclose(t2.grad, expected_t, atol=1e-6)
    assert torch.allclose(h2.grad, expected_h, atol=1e-6)


@pytest.mark.parametrize("independent", [False, True])
def test_fused_kernel_equals_the_written_out_math(independent):
    """JumpReLUTanh computes JumpReLU + Σ tanh(c f‖W_D‖) exactly, with the same gradients."""
    m = _model(independent=independent)
    x = torch.randn(37, 3, 8, generator=torch.Generator().manual_seed(3))
    m.kernels = KernelOptions(fused=True)
    a, ga = _loss_and_grads(m, x)
    m.kernels = KernelOptions(fused=False)
    b, gb = _loss_and_grads(m, x)
    assert torch.allclose(a.loss, b.loss, rtol=1e-6)
    assert torch.equal(a.features, b.features) and torch.equal(a.active, b.active)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-5, atol=1e-5), name


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("kernels", KERNEL_VARIANTS)
def test_encode_gives_the_features_of_the_forward_pass(independent, kernels):
    """encode() skips the penalty's sum but keeps the gate: bit for bit the forward pass's f."""
    m = _model(independent=independent, kernels=kernels)
    x = torch.randn(64, 3, 8)
    with torch.no_grad():
        features = m(x).features
    assert (features > 0).any() and (features == 0).any()
    assert torch.equal(m.encode(x), features)


@pytest.mark.parametrize("independent", [False, True])
@pytest.mark.parametrize("kernels", KERNEL_VARIANTS)
def test_a_forward_without_the_penalty_reconstructs_the_same(independent, kernels):
    """penalty=False (initialisation, evaluation) skips the tanh but not the gate: the same reconstruction,
    error and activity bit for bit, the reconstruction term as the loss, and no penalty to misread."""
    m = _model(independent=independent, kernels=kernels)
    x = torch.randn(64, 3, 8)
    with torch.no_grad():
        full, measured = m(x, sparsity_coefficient=0.3), m(x, sparsity_coefficient=0.3, penalty=False)
    assert (full.active > 0).any()
    for name in ("reconstruction", "features", "reconstruction_loss", "squared_error", "active", "total_variance"):
        assert torch.equal(getattr(measured, name), getattr(full, name)), name
    assert torch.equal(measured.loss, full.reconstruction_loss) and not torch.equal(full.loss, measured.loss)
    assert torch.isnan(measured.sparsity_loss)


def test_the_math_reads_like_the_equations():
    """Check forward() against a direct loop over snapshots and features (paper's formulas)."""
    m = _model(S=2, d=5, F=6)
    cfg = m.config
    x = torch.randn(9, 2, 5, generator=torch.Generator().manual_seed(4))
    out = m(x, sparsity_coefficient=0.3)
    with torch.no_grad():
        h = sum(x[:, s] @ m.W_E[s] for s in range(2)) + m.b_E  # [batch, feature]
        norms = m.W_D.norm(dim=-1)
        theta = m.log_threshold.exp()
        f = torch.stack([h * (h * norms[s] > theta) for s in range(2)], 1)  # [batch, snapshot, feature]
        x_hat = torch.stack([f[:, s] @ m.W_D[s] + m.b_D[s] for s in range(2)], 1)
        recon = ((x_hat - x) ** 2).sum(2).mean((0, 1))  # mean over the batch and the snapshots
        p = torch.tanh(cfg.tanh_scale * f * norms[None]).mean((0, 1))
        penalty = (p * (1 + p / cfg.quad_scale)).sum()
    assert torch.allclose(out.features, f, atol=1e-6)
    assert torch.allclose(out.reconstruction, x_hat, atol=1e-5)
    assert torch.allclose(out.reconstruction_loss, recon, rtol=1e-5)
    assert torch.allclose(out.sparsity_loss, penalty, rtol=1e-5)
    assert torch.allclose(out.loss, recon + 0.3 * penalty, rtol=1e-5)
    assert torch.equal(out.active.long(), (f > 0).sum(0))


def test_loss_by_hand_two_snapshots_three_features():
    """x¹ = (1, 0), x² = (0, 2); h = (1, 1, 1); feature 0 lives in snapshot 1 only, feature 1 in snapshot 2
    only, feature 2 in both (‖W_D‖ = 1 | 0, 0 | 2, 0.5 | 0.5; threshold 0.1): f¹ = (1, 0, 1), f² = (0, 1, 1),
    x̂¹ = (1.5, 0), x̂² = (0, 2.5), so each snapshot's squared error is 0.25 and their mean is 0.25.
    p̂ = (tanh 4 / 2, tanh 8 / 2, tanh 2) and Σ p̂(1 + p̂/0.01) = 144.86507461150313."""
    m = Crosscoder(CrosscoderConfig(n_snapshots=2, d_model=2, dict_size=3, decoder_init_norm=1.0))
    with torch.no_grad():
        m.W_E.copy_(torch.tensor([[[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0], [0.0, 0.5, 0.0]]]))
        m.W_D.copy_(torch.tensor([[[1.0, 0.0], [0.0, 0.0], [0.5, 0.0]], [[0.0, 0.0], [0.0, 2.0], [0.0, 0.5]]]))
        m.b_E.zero_(), m.b_D.zero_(), m.log_threshold.fill_(math.log(0.1))
    out = m(torch.tensor([[[1.0, 0.0], [0.0, 2.0]]]), sparsity_coefficient=0.5)
    assert torch.equal(out.features, torch.tensor([[[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]]))
    assert out.reconstruction_loss.item() == pytest.approx(0.25, rel=1e-6)  # the sum over snapshots would be 0.5
    assert out.sparsity_loss.item() == pytest.approx(144.86507461150313, rel=1e-5)
    assert out.loss.item() == pytest.approx(72.68253730575157, rel=1e-5)


def test_crosscoder_over_copies_of_one_snapshot_is_that_snapshots_sae():
    """S identical snapshots, each with the SAE's decoder and 1/S of its encoder (so h is the SAE's): the same
    loss, reconstruction and features; per snapshot the encoder gets the SAE's gradient, the decoder 1/S of it
    (the S decoders together: the SAE's), the shared b_E and threshold the SAE's."""
    S = 3
    sae = _model(S=1, seed=11)
    x1 = torch.randn(41, 1, 8, generator=torch.Generator().manual_seed(12))
    cc = Crosscoder(sae.config.replace(n_snapshots=S), initialise=False)
    with torch.no_grad():
        cc.W_E.copy_(sae.W_E.expand(S, -1, -1) / S)
        cc.W_D.copy_(sae.W_D.expand(S, -1, -1))
        cc.b_D.copy_(sae.b_D.expand(S, -1))
        cc.b_E.copy_(sae.b_E)
        cc.log_threshold.copy_(sae.log_threshold)
    for fused in (True, False):
        sae.kernels = cc.kernels = KernelOptions(fused=fused)
        sae.zero_grad(), cc.zero_grad()
        a = sae(x1, sparsity_coefficient=0.7)
        b = cc(x1.expand(-1, S, -1), sparsity_coefficient=0.7)
        a.loss.backward(), b.loss.backward()
        assert b.loss.item() == pytest.approx(a.loss.item(), rel=1e-5)
        assert b.reconstruction_loss.item() == pytest.approx(a.reconstruction_loss.item(), rel=1e-5)
        assert b.sparsity_loss.item() == pytest.approx(a.sparsity_loss.item(), rel=1e-5)
        for s in range(S):
            assert torch.allclose(b.features[:, s], a.features[:, 0], atol=1e-6)
            assert torch.allclose(b.reconstruction[:, s], a.reconstruction[:, 0], atol=1e-5)
            assert torch.allclose(cc.W_E.grad[s], sae.W_E.grad[0], rtol=1e-4, atol=1e-6)
            assert torch.allclose(cc.W_D.grad[s] * S, sae.W_D.grad[0], rtol=1e-4, atol=1e-6)
            assert torch.allclose(cc.b_D.grad[s] * S, sae.b_D.grad[0], rtol=1e-4, atol=1e-6)
        assert torch.allclose(cc.b_E.grad, sae.b_E.grad, rtol=1e-4, atol=1e-6)
        assert torch.allclose(cc.log_threshold.grad, sae.log_threshold.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("activation, sparsity", [("jumprelu", "tanh-quad"), ("jumprelu", "l1"),
                                                  ("relu", "l1"), ("relu", "tanh-quad"), ("topk", "tanh-quad")])
def test_penalty_is_invariant_to_scaling_decoder_up_and_features_down(activation, sparsity):
    m = _model(activation=activation, sparsity=sparsity, k=5)
    x = torch.randn(30, 3, 8, generator=torch.Generator().manual_seed(5))
    before = m(x, sparsity_coefficient=1.0)
    alpha = torch.rand(16, generator=torch.Generator().manual_seed(6)) * 5 + 0.2  # per feature
    with torch.no_grad():
        m.W_D.mul_(alpha[None, :, None])  # ‖W_D,i‖ × α_i
        m.W_E.div_(alpha)  # h_i / α_i, so f_i / α_i
        m.b_E.div_(alpha)
    after = m(x, sparsity_coefficient=1.0)
    assert torch.allclose(after.features * alpha, before.features, rtol=1e-4, atol=1e-5)
    assert torch.allclose(after.reconstruction, before.reconstruction, rtol=1e-4, atol=1e-4)
    assert torch.allclose(after.sparsity_loss, before.sparsity_loss, rtol=1e-4)
    assert torch.allclose(after.loss, before.loss, rtol=1e-4)


def test_relu_l1_is_anthropics_penalty_and_topk_keeps_k():
    m = _model(activation="relu", sparsity="l1")
    x = torch.randn(20, 3, 8)
    out = m(x)
    f = out.features[:, 0]  # the same in every snapshot
    assert torch.equal(out.features[:, 1], f)
    expected = (f * m.W_D.norm(dim=-1).sum(0)).sum(1).mean()  # mean_batch Σ_i f_i Σ_θ ‖W_D,i^θ‖
    assert torch.allclose(out.sparsity_loss, expected, rtol=1e-5)
    top = _model(activation="topk", k=3)
    assert int((top.encode(x)[:, 0] > 0).sum(1).max()) <= 3


def test_decoder_norm_zero_switches_a_feature_off_at_that_snapshot():
    m = _model()
    with torch.no_grad():
        m.W_D[1, 4] = 0
        m.W_D[0, 4] = 1.0 / math.sqrt(8)  # unit norm
        m.W_E[:, :, 4] = 0
        m.b_E[4] = 5.0  # h = 5 on every row: fires wherever ‖W_D‖ > 0
        m.log_threshold[4] = 0.0
    f = m.encode(torch.randn(10, 3, 8))
    assert (f[:, 1, 4] == 0).all() and (f[:, 0, 4] > 0).all()


def test_initialisation_follows_the_paper():
    m = Crosscoder(CrosscoderConfig(n_snapshots=3, d_model=8, dict_size=16, decoder_init_norm=0.2), seed=0)
    assert torch.allclose(m.W_D[0], m.W_D[2])  # one direction per feature, shared by all snapshots
    assert torch.allclose(m.decoder_norms(), torch.full((3, 16), 0.2))
    assert torch.equal(m.W_E, m.W_D.transpose(1, 2))
    assert not m.b_E.any() and not m.b_D.any()
    assert torch.allclose(m.log_threshold.exp(), torch.full((16,), 0.1))
    assert torch.equal(Crosscoder(m.config, seed=0).W_D, m.W_D)  # deterministic for a seed


# ----------------------------------------------------------------------------------- SAEs

def test_independent_saes_are_standalone_saes():
    m = _model(independent=True)
    x = torch.randn(25, 3, 8, generator=torch.Generator().manual_seed(7))
    out = m(x, sparsity_coefficient=0.5)
    total = 0.0
    for s in range(3):
        sae = m.sae(s)
        assert sae.config.n_snapshots == 1 and not sae.config.independent
        o = sae(x[:, s:s + 1], sparsity_coefficient=0.5)
        assert torch.allclose(o.features[:, 0], out.features[:, s], atol=1e-6)
        assert torch.allclose(o.reconstruction[:, 0], out.reconstruction[:, s], atol=1e-5)
        total = total + o.loss
    assert torch.allclose(out.loss, total, rtol=1e-5)  # the stacked loss is the sum of the SAE losses
    restacked = Crosscoder.stack([m.sae(s) for s in range(3)])
    assert all(torch.equal(a, b) for a, b in zip(restacked.state_dict().values(), m.state_dict().values()))


def test_a_crosscoder_is_not_a_set_of_saes():
    with pytest.raises(ParameterError, match="independent"):
        _model().sae(0)


# ----------------------------------------------------------------------------------- save / load

def test_save_load_round_trip_and_corruption(tmp_path):
    m = _model(independent=True, activation="jumprelu")
    m.save(tmp_path / "m")
    back = Crosscoder.load(tmp_path / "m")
    assert back.config == m.config
    for (n, a), b in zip(m.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), n
    x = torch.randn(4, 3, 8)
    assert torch.equal(back(x).loss, m(x).loss)

    weights = tmp_path / "m" / WEIGHTS_FILE
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="corrupted"):
        Crosscoder.load(tmp_path / "m")
    weights.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        Crosscoder.load(tmp_path / "m")
    with pytest.raises(ArtifactError, match="missing"):
        Crosscoder.load(tmp_path / "nothing")


@pytest.mark.parametrize("independent", [False, True])
def test_the_encoder_is_stored_as_its_matmul_reads_it(independent, tmp_path):
    """W_E [snapshot, d_model, feature] lies in memory as [dictionary, feature, snapshot·d_model]: the encoder's
    view of it is W_E's own memory (no transposing copy per step), its gradient arrives in that layout, and a
    saved file holds the plain [snapshot, d_model, feature] array."""
    from einops import rearrange

    m = _model(S=3, independent=independent)
    G = m.config.n_dictionaries
    view = rearrange(m.W_E, "(dictionary snapshot) d_model feature -> dictionary feature (snapshot d_model)",
                     dictionary=G)
    assert view.is_contiguous() and view.data_ptr() == m.W_E.data_ptr()
    assert not m.W_E.is_contiguous()  # (the test would pass for any layout otherwise)
    m.train()
    m(torch.randn(64, 3, 8)).loss.backward()
    assert m.W_E.grad.stride() == m.W_E.stride()
    m.save(tmp_path / "m")
    back = Crosscoder.load(tmp_path / "m")
    assert back.W_E.stride() == m.W_E.stride() and torch.equal(back.W_E, m.W_E)
    import safetensors.torch
    assert torch.equal(safetensors.torch.load_file(tmp_path / "m" / WEIGHTS_FILE)["W_E"], m.W_E.detach().contiguous())


def test_load_refuses_a_config_that_does_not_match_the_weights(tmp_path):
    import json

    m = _model()
    m.save(tmp_path / "m")
    meta = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    meta["config"]["dict_size"] = 17
    meta["sha256"] = None
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="shape"):
        Crosscoder.load(tmp_path / "m")


def test_log_threshold_init_and_bf16_autocast_forward():
    m = _model()
    x = torch.randn(16, 3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.features.dtype == torch.bfloat16 and out.loss.dtype == torch.float32
    assert math.isfinite(float(out.loss.detach()))
    ref = m(x)
    r16, r32 = float(out.reconstruction_loss.detach()), float(ref.reconstruction_loss.detach())
    assert abs(r16 - r32) < 0.05 * r32


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler for torch.compile")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_compiled_kernels_equal_the_eager_ones():
    """The default fast path (torch.compile of the fused kernels) computes the same values and gradients."""
    m = _model(S=2, d=8, F=16)
    x = torch.randn(24, 2, 8, generator=torch.Generator().manual_seed(8))
    m.kernels = KernelOptions(compiled=False)
    b, gb = _loss_and_grads(m, x, sparsity_coefficient=0.5)
    m.kernels = KernelOptions(compiled=True)
    a, ga = _loss_and_grads(m, x, sparsity_coefficient=0.5)
    assert not kernel_module._COMPILE_FAILED, kernel_module._COMPILE_FAILED  # it really compiled (a C++ compiler is available)
    assert torch.allclose(a.loss, b.loss, rtol=1e-5) and torch.equal(a.active, b.active)
    assert torch.allclose(a.features, b.features, atol=1e-6)
    for name in ga:
        assert torch.allclose(ga[name], gb[name], rtol=1e-4, atol=1e-5), name


# ----------------------------------------------------------------------------------- sparse products

def _count_sparse_steps(monkeypatch) -> list[int]:
    calls, original = [], ActivePattern.of
    monkeypatch.setattr(ActivePattern, "of", classmethod(lambda cls, f: calls.append(1) or original(f)))
    return calls


@pytest.mark.parametrize("S, independent, compiled", [
    (1, False, False), (3, True, False), (3, False, False),
    pytest.param(1, False, True, marks=pytest.mark.skipif(
        not any(shutil.which(c) for c in ("c++", "g++", "clang++")), reason="no C++ compiler for torch.compile")),
])
def test_sparse_products_equal_the_dense_ones(S, independent, compiled, monkeypatch):
    """Training's sparse gate, decoder and W_E/W_D gradients compute the dense passes' values (fp32: to rounding)."""
    m = _model(S=S, F=64, independent=independent, kernels=KernelOptions(compiled=compiled, sparse=False))
    x = torch.randn(53, S, 8, generator=torch.Generator().manual_seed(4))
    dense, dense_grads = _loss_and_grads(m, x)
    m.kernels = m.kernels.replace(sparse=True)  # whatever the density
    calls = _count_sparse_steps(monkeypatch)
    sparse, sparse_grads = _loss_and_grads(m, x)
    assert calls == [1]  # the sparse path really ran
    assert 0 < dense.active.sum() < dense.features.numel()  # some features on, some off
    assert torch.allclose(sparse.loss, dense.loss, rtol=1e-6)
    assert torch.allclose(sparse.reconstruction, dense.reconstruction, atol=1e-5)
    assert torch.equal(sparse.active, dense.active)
    for name, grad in dense_grads.items():
        assert torch.allclose(sparse_grads[name], grad, rtol=1e-5, atol=1e-6), name


def test_sparse_products_under_bf16_autocast_match_to_bf16_rounding(monkeypatch):
    m = _model(S=1, d=32, F=256, kernels=KernelOptions(sparse=False))
    x = torch.randn(300, 1, 32, generator=torch.Generator().manual_seed(5))
    dense, dense_grads = _loss_and_grads(m, x, bf16=True)
    m.kernels = KernelOptions(sparse=True)
    calls = _count_sparse_steps(monkeypatch)
    sparse, sparse_grads = _loss_and_grads(m, x, bf16=True)
    assert calls == [1]
    assert sparse.reconstruction.dtype == dense.reconstruction.dtype == torch.bfloat16
    assert torch.allclose(sparse.loss.float(), dense.loss.float(), rtol=1e-3)
    for name, grad in dense_grads.items():
        error = (sparse_grads[name] - grad).norm() / grad.norm()
        assert error < 1e-2, (name, float(error))  # bf16 has ~3 significant digits


def test_sparse_products_run_only_when_f_is_sparse_and_in_training(monkeypatch):
    m = _model(S=1, F=64)  # KernelOptions(sparse=None): automatic
    x = torch.randn(40, 1, 8, generator=torch.Generator().manual_seed(6))
    calls = _count_sparse_steps(monkeypatch)
    density = float(m(x).active.sum()) / (40 * 64)  # (this forward is in training mode: it may count)
    calls.clear()
    monkeypatch.setattr(kernel_module, "SPARSE_MAX_DENSITY", density * 0.99)
    m(x)
    assert calls == []  # denser than allowed: dense products
    monkeypatch.setattr(kernel_module, "SPARSE_MAX_DENSITY", density)
    m(x)
    assert calls == [1]
    m.eval()
    m(x)
    with torch.no_grad():
        m.train()(x)
    assert calls == [1]  # evaluation and no-grad passes stay dense


def test_kernel_options_are_one_switch_that_travels_with_the_model():
    options = KernelOptions(fused=False, sparse=False)
    m = _model(S=3, independent=True, kernels=options)
    assert m.sae(1).kernels is options and m.select_snapshots([0, 2]).kernels is options
    assert Crosscoder.stack([m.sae(0), m.sae(2)]).kernels is options
    assert Crosscoder.from_state(m.config, m.state_dict(), kernels=options).kernels is options
    assert options.eager() == options and KernelOptions(compiled=True).eager() == KernelOptions()
    with pytest.raises(ParameterError, match="sparse"):
        KernelOptions(sparse="auto")
    with pytest.raises(ParameterError, match="kernels"):
        Crosscoder(m.config, kernels={"fused": False})


def test_active_pattern_indexes_every_nonzero_once():
    g = torch.Generator().manual_seed(7)
    S, F, B = 2, 5, 7
    f = torch.where(torch.rand(S, F, B, generator=g) < 0.3, torch.rand(S, F, B, generator=g) + 0.1, 0.0)
    p = ActivePattern.of(f)
    nonzero = f.nonzero().tolist()  # (snapshot, feature, batch) in feature-major order
    assert p.flat.tolist() == [(s * F + i) * B + b for s, i, b in nonzero]
    assert p.row.tolist() == [s * B + b for s, i, b in nonzero]
    counts = (f > 0).sum(-1).flatten()
    assert p.feature_offsets.tolist() == (counts.cumsum(0) - counts).tolist()
    by_token = sorted(nonzero, key=lambda sib: (sib[0], sib[2]))  # stable: features ascending within a row
    assert [nonzero[k] for k in p.token_order.tolist()] == by_token
    assert p.token_feature.tolist() == [s * F + i for s, i, b in by_token]
    token_counts = (f > 0).sum(1).flatten()
    assert p.token_offsets.tolist() == (token_counts.cumsum(0) - token_counts).tolist()
    for dtype in (torch.bfloat16, torch.float64):
        assert torch.equal(ActivePattern.of(f.to(dtype)).flat, p.flat)
