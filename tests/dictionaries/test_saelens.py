"""Export to sae-lens: `sae_lens.SAE.load_from_disk` loads our per-snapshot SAEs and reproduces their
features and reconstructions (normalisation folded in), and the import reads them back."""

from __future__ import annotations

import json

import pytest
import torch

from crosslib.activations.sources import TensorSource
from crosslib.config import ParameterError
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig
from crosslib.dictionaries.saelens import export_all_saelens, export_saelens, import_saelens

sae_lens = pytest.importorskip("sae_lens")  # importing it takes ~5-10 s


def _independent_model(S=3, d=16, F=40) -> Crosscoder:
    m = Crosscoder(CrosscoderConfig(n_snapshots=S, d_model=d, dict_size=F, independent=True, decoder_init_norm=0.3))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        m.W_D.mul_(torch.rand(S, F, 1, generator=g) * 2)  # decoder norms vary, so the threshold mapping matters
        m.log_threshold.copy_(torch.rand(S, F, generator=g) * 4 - 3)
        m.b_E.copy_(torch.randn(S, F, generator=g) * 0.2)
        m.b_D.copy_(torch.randn(S, d, generator=g) * 0.2)
        m.W_D[1, 5] = 0  # a feature absent at snapshot 1
    return m


def test_saelens_loads_our_sae_and_reproduces_it(tmp_path):
    m = _independent_model()
    raw = torch.randn(600, 3, 16, generator=torch.Generator().manual_seed(1)) * torch.tensor([1.0, 3.0, 0.5])[:, None]
    source = TensorSource(raw)
    paths = export_all_saelens(m, tmp_path, norm_factors=source.norm_factors, steps=[0, 64, 512])
    assert [p.name for p in paths] == ["step0", "step64", "step512"]
    ours = m(source.rows("all"), sparsity_coefficient=0.0)  # trained on normalised activations
    for s, path in enumerate(paths):
        sae = sae_lens.SAE.load_from_disk(str(path))
        assert type(sae).__name__ == "JumpReLUSAE"
        with torch.no_grad():
            features = sae.encode(raw[:, s])  # raw activations: the normalisation is folded into the weights
            recon = sae.decode(features)
        assert 0 < (features > 0).float().mean() < 0.9
        assert torch.allclose(features, ours.features[:, s], atol=1e-5)
        assert torch.allclose(recon, ours.reconstruction[:, s] / float(source.norm_factors[s]), atol=1e-5)
        assert json.loads((path / "cfg.json").read_text())["metadata"]["crosslib_norm_factor"] == pytest.approx(
            float(source.norm_factors[s]))

        back = import_saelens(path)  # and back: an S=1 Crosscoder on raw activations
        again = back(raw[:, s:s + 1], sparsity_coefficient=0.0)
        assert torch.allclose(again.features[:, 0], features, atol=1e-5)
        assert torch.allclose(again.reconstruction[:, 0], recon, atol=1e-5)


def test_export_without_folding_and_refusals(tmp_path):
    sae = _independent_model().sae(2)
    path = export_saelens(sae, tmp_path / "plain")
    loaded = sae_lens.SAE.load_from_disk(str(path))
    x = torch.randn(50, 1, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.decode(loaded.encode(x[:, 0])), sae(x).reconstruction[:, 0], atol=1e-5)
    crosscoder = Crosscoder(CrosscoderConfig(n_snapshots=2, d_model=4, dict_size=8))
    with pytest.raises(ParameterError, match="independent"):
        export_saelens(crosscoder, tmp_path / "cc")
    topk = Crosscoder(CrosscoderConfig(n_snapshots=1, d_model=4, dict_size=8, activation="topk", k=2))
    with pytest.raises(ParameterError, match="activation='topk'"):
        export_saelens(topk, tmp_path / "topk")
    with pytest.raises(ParameterError, match="norm_factor"):
        export_saelens(sae, tmp_path / "bad", norm_factor=-1.0)
