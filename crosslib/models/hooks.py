"""Hook names as TransformerLens/SAELens users write them, and activation capture on GPT-NeoX.

Hook names (``L`` counts layers from 0, as in TransformerLens):

=============================  ==========================================================
``blocks.{L}.hook_resid_pre``   residual stream entering layer L (= HF hidden_states[L])
``blocks.{L}.hook_resid_mid``   after attention, before the MLP -- only for sequential
                                blocks; Pythia uses a *parallel* residual (attention and MLP
                                both read resid_pre), so it has no resid_mid
``blocks.{L}.hook_attn_out``    attention output of layer L (after the output projection)
``blocks.{L}.hook_mlp_out``     MLP output of layer L
``blocks.{L}.hook_resid_post``  residual stream leaving layer L (= HF hidden_states[L+1],
                                except that HF applies the final layer norm to the last one)
=============================  ==========================================================

Three ways to touch an activation:

* `capture(model, hook, input_ids)` -- the activation, computing nothing past the hook: it runs
  the model's own embedding, rotary embedding and layer modules up to the hook's layer
  (``method="truncate"``, the default) or runs the model and aborts it from a forward hook
  (``method="stop"``); `benchmarks/bench_cache.py` compares the two.
* `record_hooks(model, hooks)` -- keep activations (with their autograd graph) during an
  ordinary forward pass, e.g. for activation x gradient attribution.
* `replace_hook(model, hook, fn)` -- replace the activation by ``fn(activation)`` during
  ordinary forward passes, e.g. to splice a dictionary's reconstruction into the model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from crosslib.config import ParameterError

HOOK_KINDS: tuple[str, ...] = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
HOOK_FORMS: tuple[str, ...] = tuple(f"blocks.{{L}}.hook_{kind}" for kind in HOOK_KINDS)
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_([a-z_]+)$")
CAPTURE_METHODS: tuple[str, ...] = ("truncate", "stop")


@dataclasses.dataclass(frozen=True)
class HookPoint:
    """A parsed hook name: the layer and the kind of activation (one of `HOOK_KINDS`)."""

    layer: int
    kind: str

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.hook_{self.kind}"

    def __str__(self) -> str:
        return self.name

    @property
    def layers_needed(self) -> int:
        """How many transformer layers must run (fully or partly) to produce this activation."""
        return self.layer if self.kind == "resid_pre" else self.layer + 1


def parse_hook(hook: str | HookPoint) -> HookPoint:
    """Parse a hook name such as ``blocks.2.hook_resid_post`` (syntax only; see `validate_hook`)."""
    if isinstance(hook, HookPoint):
        return hook
    m = _HOOK_RE.match(hook) if isinstance(hook, str) else None
    if m is None or m.group(2) not in HOOK_KINDS:
        raise ParameterError(
            f"hook={hook!r} is not a known hook name: use one of {list(HOOK_FORMS)} with L a layer index "
            "(TransformerLens/SAELens naming, e.g. 'blocks.2.hook_resid_post')"
        )
    return HookPoint(int(m.group(1)), m.group(2))


def _config_of(model_or_config: Any) -> Any:
    return getattr(model_or_config, "config", model_or_config)


def validate_hook(hook: str | HookPoint, model_or_config: Any) -> HookPoint:
    """Parse `hook` and check it exists in this model: layer in range, resid_mid only if sequential."""
    point = parse_hook(hook)
    config = _config_of(model_or_config)
    n_layers = int(config.num_hidden_layers)
    if not 0 <= point.layer < n_layers:
        raise ParameterError(
            f"hook={point.name!r}: layer {point.layer} is out of range; this model has n_layers={n_layers}, "
            f"so L must be in 0..{n_layers - 1}"
        )
    if point.kind == "resid_mid" and getattr(config, "use_parallel_residual", False):
        raise ParameterError(
            f"hook={point.name!r} does not exist in this model: it uses a parallel residual "
            "(use_parallel_residual=True, as Pythia does), where attention and MLP both read resid_pre, so "
            "there is no resid_mid. Use hook_resid_pre, hook_attn_out, hook_mlp_out or hook_resid_post."
        )
    return point


def hook_names(model_or_config: Any) -> list[str]:
    """Every valid hook name of this model, layer by layer."""
    config = _config_of(model_or_config)
    names = []
    for layer in range(int(config.num_hidden_layers)):
        for kind in HOOK_KINDS:
            if kind == "resid_mid" and getattr(config, "use_parallel_residual", False):
                continue
            names.append(f"blocks.{layer}.hook_{kind}")
    return names


def _base(model: Any) -> Any:
    """The GPTNeoXModel inside a GPTNeoXForCausalLM (or the model itself)."""
    base = getattr(model, "gpt_neox", model)
    if not hasattr(base, "layers") or not hasattr(base, "embed_in"):
        raise ParameterError(
            f"model={type(model).__name__} is not supported: crosslib.models.hooks needs a GPT-NeoX (Pythia) model, "
            "i.e. transformers' GPTNeoXForCausalLM or GPTNeoXModel"
        )
    return base


# --------------------------------------------------------------------------- truncated forward


@functools.cache
def _cache_argument() -> str:
    """The name `create_causal_mask` takes the KV cache under: `cache` since transformers 5.x renamed
    `past_key_values` (deprecated, removed in 5.40); read from the signature so either version works."""
    import inspect

    from transformers.masking_utils import create_causal_mask

    return "cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values"


class _Stop(Exception):
    """Raised from a forward hook to abort the model once the activation is captured."""

    def __init__(self, value: Tensor):
        self.value = value


def _truncated(base: Any, point: HookPoint, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor:
    """Run embeddings and layers up to the hook with the model's own modules; nothing past it."""
    from transformers.masking_utils import create_causal_mask

    inputs_embeds = base.embed_in(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0)
    mask = create_causal_mask(
        config=base.config,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **{_cache_argument(): None},
    )
    hidden = base.emb_dropout(inputs_embeds)
    position_embeddings = base.rotary_emb(hidden, position_ids=position_ids)
    layer_kwargs = dict(attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
    for layer in base.layers[: point.layer]:
        hidden = layer(hidden, **layer_kwargs)
    if point.kind == "resid_pre":
        return hidden
    layer = base.layers[point.layer]
    if point.kind == "resid_post":
        return layer(hidden, **layer_kwargs)
    if point.kind == "mlp_out" and layer.use_parallel_residual:  # the MLP reads resid_pre: skip attention
        return layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(hidden)))
    attn = layer.attention(layer.input_layernorm(hidden), **layer_kwargs)[0]
    attn = layer.post_attention_dropout(attn)
    if point.kind == "attn_out":
        return attn
    mid = attn + hidden  # sequential block
    if point.kind == "resid_mid":
        return mid
    return layer.post_mlp_dropout(layer.mlp(layer.post_attention_layernorm(mid)))  # mlp_out


def capture(
    model: Any,
    hook: str | HookPoint,
    input_ids: Int[Tensor, "batch pos"],
    *,
    attention_mask: Tensor | None = None,
    method: str = "truncate",
) -> Float[Tensor, "batch pos d_model"]:
    """The activation at `hook` for `input_ids`, computing nothing past the hook.

    ``method="truncate"`` runs the model's own modules up to the hook; ``method="stop"`` runs the
    model's forward and aborts it from a forward hook. Both give the activation of a full forward.
    Gradients flow unless called under ``torch.no_grad()``/``torch.inference_mode()``.
    """
    point = validate_hook(hook, model)
    if method not in CAPTURE_METHODS:
        raise ParameterError(f"method={method!r} is not allowed: choose one of {list(CAPTURE_METHODS)}")
    base = _base(model)
    if method == "truncate":
        return _truncated(base, point, input_ids, attention_mask)

    def stop(value: Tensor) -> Tensor:
        raise _Stop(value)

    try:
        with _hooked(base, point, stop):
            base(input_ids, attention_mask=attention_mask, use_cache=False)
    except _Stop as s:
        return s.value
    raise RuntimeError(f"the forward pass never reached {point.name}")  # pragma: no cover


def capture_all(
    model: Any,
    hooks: Sequence[str | HookPoint],
    input_ids: Int[Tensor, "batch pos"],
    *,
    attention_mask: Tensor | None = None,
) -> list[Float[Tensor, "batch pos d_model"]]:
    """The activations at several hooks from one forward pass, each equal to `capture` at its hook.

    Runs the layers up to the deepest hook's layer once (`capture` for each hook would run the lower
    layers again for every hook above them).
    """
    points = [validate_hook(h, model) for h in hooks]
    if len(points) == 1:
        return [capture(model, points[0], input_ids, attention_mask=attention_mask)]
    last = HookPoint(max(p.layer for p in points), "resid_post")  # runs every requested layer whole
    with record_hooks(model, [p.name for p in points]) as recorded:
        _truncated(_base(model), last, input_ids, attention_mask)
    return [recorded[p.name] for p in points]


# --------------------------------------------------------------------------- module hooks


def _replace_first(output: Any, value: Tensor) -> Any:
    if isinstance(output, tuple):
        return (value, *output[1:])
    return value


def _first(output: Any) -> Tensor:
    return output[0] if isinstance(output, tuple) else output


@contextlib.contextmanager
def _hooked(base: Any, point: HookPoint, fn: Callable[[Tensor], Tensor | None]) -> Iterator[None]:
    """Call ``fn(activation)`` at `point` during forward passes; a returned tensor replaces it."""
    layer = base.layers[point.layer]
    handles = []
    if point.kind == "resid_pre":

        def pre(module, args, kwargs):
            if args:
                new = fn(args[0])
                return None if new is None else ((new, *args[1:]), kwargs)
            new = fn(kwargs["hidden_states"])
            return None if new is None else (args, {**kwargs, "hidden_states": new})

        handles.append(layer.register_forward_pre_hook(pre, with_kwargs=True))
    elif point.kind in ("resid_post", "attn_out", "mlp_out"):
        module = {"resid_post": layer, "attn_out": layer.attention, "mlp_out": layer.mlp}[point.kind]

        def post(module, args, output):
            new = fn(_first(output))
            return None if new is None else _replace_first(output, new)

        handles.append(module.register_forward_hook(post))
    else:  # resid_mid of a sequential block = resid_pre + attention output, not a module boundary
        saved: dict[str, Tensor] = {}

        def keep_pre(module, args, kwargs):
            saved["pre"] = args[0] if args else kwargs["hidden_states"]

        def mid(module, args, output):
            attn = _first(output)
            new = fn(saved["pre"] + attn)
            return None if new is None else _replace_first(output, new - saved["pre"])

        handles.append(layer.register_forward_pre_hook(keep_pre, with_kwargs=True))
        handles.append(layer.attention.register_forward_hook(mid))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def replace_hook(model: Any, hook: str | HookPoint, fn: Callable[[Tensor], Tensor]) -> Iterator[None]:
    """Within the block, forward passes use ``fn(activation)`` in place of the activation at `hook`.

        with replace_hook(model, "blocks.2.hook_resid_post", lambda x: decode(encode(x))):
            logits = model(input_ids).logits

    `fn` gets the ``[batch, pos, d_model]`` tensor and must return one of the same shape.
    """
    point = validate_hook(hook, model)

    def checked(x: Tensor) -> Tensor:
        new = fn(x)
        if not isinstance(new, Tensor) or new.shape != x.shape:
            raise ParameterError(
                f"fn for replace_hook({point.name!r}) must return a tensor of shape {tuple(x.shape)}, "
                f"got {getattr(new, 'shape', type(new).__name__)}"
            )
        return new

    with _hooked(_base(model), point, checked):
        yield


@contextlib.contextmanager
def record_hooks(model: Any, hooks: str | Sequence[str]) -> Iterator[dict[str, Tensor]]:
    """Record the activations at `hooks` during forward passes into the yielded dict (name -> tensor).

    Tensors keep their autograd graph (call ``.retain_grad()`` on them for activation x gradient).
    A later forward pass overwrites the entries.
    """
    names = [hooks] if isinstance(hooks, str) else list(hooks)
    points = [validate_hook(h, model) for h in names]
    base = _base(model)
    store: dict[str, Tensor] = {}
    with contextlib.ExitStack() as stack:
        for point in points:

            def keep(x: Tensor, name: str = point.name) -> None:
                store[name] = x

            stack.enter_context(_hooked(base, point, keep))
        yield store
