"""Per-snapshot SAEs to and from sae-lens's on-disk format (`SAE.load_from_disk`).

A JumpReLU SAE of ours (a Crosscoder with S = 1, or one snapshot of an independent model) gates on
the feature's contribution norm, f = h·H(h‖W_D‖ − e^t). sae-lens's `jumprelu` architecture gates
on h itself, f = ReLU(h)·H(h − threshold), with one threshold per feature. For ‖W_D,i‖ > 0 the two
agree with threshold_i = e^{t_i}/‖W_D,i‖ (and then h > threshold > 0, so the ReLU is the identity);
a feature with a zero decoder row never fires in ours, so it gets an infinite threshold.

Normalisation. We train on x̃ = s·x with s = √d / E‖x‖ (per snapshot). sae-lens's loader applies no
normalisation for `normalize_activations="none"`, so by default (`norm_factor=s`) we fold s into the
weights the way sae-lens's own `fold_activation_norm_scaling_factor` does: W_enc·s, W_dec/s, b_dec/s.
The exported SAE then reads raw activations and reconstructs them at their raw scale, i.e.
sae(x) = x̂(s·x)/s, with the same features f. With `norm_factor=None` the weights are exported as
trained (the SAE expects normalised inputs) and s is recorded in the metadata as
`crosslib_norm_factor` only.

sae-lens is only needed to load the result (importing it takes ~9 s); writing uses safetensors+JSON.
"""

from __future__ import annotations

import math
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from crosslib.artifacts import ArtifactError, atomic_write_bytes, atomic_write_json, read_json_object
from crosslib.config import ParameterError, require
from crosslib.dictionaries.crosscoder import Crosscoder, CrosscoderConfig

SAE_WEIGHTS_FILE = "sae_weights.safetensors"  # sae_lens.constants.SAE_WEIGHTS_FILENAME
SAE_CFG_FILE = "cfg.json"  # sae_lens.constants.SAE_CFG_FILENAME
ARCHITECTURES = {"jumprelu": "jumprelu", "relu": "standard"}


def _saelens_version() -> str:
    try:
        return importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        return "6.0.0"


@torch.no_grad()
def export_saelens(
    model: Crosscoder,
    path: str | Path,
    *,
    snapshot: int = 0,
    norm_factor: float | None = None,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write snapshot `snapshot`'s SAE in sae-lens's format (cfg.json + sae_weights.safetensors) to `path`.

    `model` is an SAE (n_snapshots = 1) or an independent model (one SAE per snapshot); a crosscoder
    over several snapshots is not a set of SAEs (its encoder reads all snapshots at once).
    `norm_factor` is the snapshot's normalisation s = √d/E‖x‖ (e.g. `source.norm_factors[i]`): folded
    into the weights so the SAE reads raw activations; None exports the normalised-space SAE.
    """
    cfg = model.config
    if cfg.activation not in ARCHITECTURES:
        raise ParameterError(f"activation={cfg.activation!r} cannot be exported to sae-lens here: "
                             f"choose one of {sorted(ARCHITECTURES)}")
    require(isinstance(snapshot, int) and not isinstance(snapshot, bool) and 0 <= snapshot < cfg.n_snapshots,
            "snapshot", snapshot, f"an index in 0..{cfg.n_snapshots - 1} (the model has {cfg.n_snapshots} snapshot(s))")
    sae = model.sae(snapshot) if cfg.n_snapshots > 1 else model
    require(norm_factor is None or (isinstance(norm_factor, (int, float)) and math.isfinite(norm_factor)
                                    and norm_factor > 0), "norm_factor", norm_factor, "None or a positive number")
    s = float(norm_factor) if norm_factor is not None else 1.0
    W_enc = sae.W_E[0].detach().float().cpu() * s  # [d_model, feature]
    W_dec = sae.W_D[0].detach().float().cpu() / s  # [feature, d_model]
    b_enc = sae.b_E.detach().float().cpu().reshape(-1)
    b_dec = sae.b_D[0].detach().float().cpu() / s
    tensors = {"W_enc": W_enc.contiguous(), "b_enc": b_enc.contiguous(), "W_dec": W_dec.contiguous(),
               "b_dec": b_dec.contiguous()}
    if cfg.activation == "jumprelu":
        norms = sae.W_D[0].detach().float().cpu().norm(dim=-1)  # the trained (unfolded) decoder norms
        e_t = sae.log_threshold.detach().float().cpu().reshape(-1).exp()
        tensors["threshold"] = torch.where(norms > 0, e_t / norms.clamp_min(1e-30),
                                           torch.tensor(torch.finfo(torch.float32).max)).contiguous()
    meta = {
        "sae_lens_version": _saelens_version(), "sae_lens_training_version": None,
        "crosslib_config": cfg.to_dict(), "crosslib_snapshot": snapshot,
        "crosslib_norm_factor": float(norm_factor) if norm_factor is not None else None,
        "crosslib_norm_folded": norm_factor is not None,
        **(metadata or {}),
    }
    config = {
        "architecture": ARCHITECTURES[cfg.activation], "d_in": cfg.d_model, "d_sae": cfg.dict_size,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": False, "normalize_activations": "none",
        "reshape_activations": "none", "metadata": meta,
    }
    path = Path(path)
    atomic_write_bytes(path / SAE_WEIGHTS_FILE, safetensors.torch.save(tensors))
    atomic_write_json(path / SAE_CFG_FILE, config)
    return path


def export_all_saelens(model: Crosscoder, directory: str | Path, *, norm_factors: Any = None,
                       steps: list[int] | None = None, metadata: dict[str, Any] | None = None) -> list[Path]:
    """Export every snapshot's SAE of an independent model (or an S = 1 SAE) to `directory/step{N}/`."""
    S = model.config.n_snapshots
    steps = list(steps) if steps is not None else list(range(S))
    require(len(steps) == S, "steps", steps, f"one step per snapshot ({S})")
    if norm_factors is not None:
        require(len(norm_factors) == S, "norm_factors", list(norm_factors), f"one factor per snapshot ({S})")
    return [export_saelens(model, Path(directory) / f"step{step}", snapshot=i,
                           norm_factor=None if norm_factors is None else float(norm_factors[i]),
                           metadata={"crosslib_step": step, **(metadata or {})})
            for i, step in enumerate(steps)]


@torch.no_grad()
def import_saelens(path: str | Path) -> Crosscoder:
    """Read a sae-lens `jumprelu` or `standard` SAE directory as an S = 1 Crosscoder (same features, same output).

    The result reads the same inputs as the sae-lens SAE (raw activations if the normalisation was
    folded in). `apply_b_dec_to_input=True` is folded into b_E.
    """
    path = Path(path)
    cfg = read_json_object(path / SAE_CFG_FILE, ("d_in", "d_sae"), parameter="path")
    architecture = cfg.get("architecture", "standard")
    activation = {v: k for k, v in ARCHITECTURES.items()}.get(architecture)
    if activation is None:
        raise ParameterError(f"architecture={architecture!r} (in {path / SAE_CFG_FILE}) is not supported: "
                             f"choose one of {sorted(ARCHITECTURES.values())}")
    if cfg.get("normalize_activations", "none") != "none":
        raise ParameterError(f"normalize_activations={cfg['normalize_activations']!r} (in {path / SAE_CFG_FILE}) "
                             "is not supported: fold the normalisation into the weights first")
    if not (path / SAE_WEIGHTS_FILE).is_file():
        raise ArtifactError(f"missing file: {path / SAE_WEIGHTS_FILE}")
    try:
        t = safetensors.torch.load_file(str(path / SAE_WEIGHTS_FILE))
    except Exception as e:
        raise ArtifactError(f"{path / SAE_WEIGHTS_FILE} is not a readable safetensors file ({e})") from None
    d, F = int(cfg["d_in"]), int(cfg["d_sae"])
    for name, shape in {"W_enc": (d, F), "b_enc": (F,), "W_dec": (F, d), "b_dec": (d,)}.items():
        if name not in t or tuple(t[name].shape) != shape:
            raise ArtifactError(f"{path / SAE_WEIGHTS_FILE}: {name} should have shape {shape}")
    W_enc, b_enc, W_dec, b_dec = (t[k].float() for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    if cfg.get("apply_b_dec_to_input", True):
        b_enc = b_enc - b_dec @ W_enc
    known = (cfg.get("metadata") or {}).get("crosslib_config") or {}
    keep = {k: v for k, v in known.items() if k in ("sparsity", "tanh_scale", "quad_scale", "bandwidth", "threshold_init")}
    config = CrosscoderConfig(n_snapshots=1, d_model=d, dict_size=F, activation=activation,
                              **{"decoder_init_norm": 0.1, **keep})
    model = Crosscoder(config, initialise=False)
    model.W_E.copy_(W_enc[None])
    model.b_E.copy_(b_enc)
    model.W_D.copy_(W_dec[None])
    model.b_D.copy_(b_dec[None])
    if activation == "jumprelu":
        threshold = t["threshold"].float()
        model.log_threshold.copy_((threshold * W_dec.norm(dim=-1)).clamp(1e-30, 1e30).log())
    else:
        model.log_threshold.fill_(math.log(config.threshold_init))
    return model
