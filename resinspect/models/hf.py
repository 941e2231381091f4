"""Hugging Face causal language models: ``--model hf:<folder or hub id>``.

The model is loaded with ``AutoModelForCausalLM.from_pretrained(..., local_files_only=True)`` from a local
folder (``save_pretrained``'s files) or from the local Hugging Face cache; nothing is downloaded. Its
decoder layers are cut into residual sites by the same anatomy as every other model: each layer's forward
is traced once, for the call the model makes (the stream, plus side inputs such as the causal mask, the
position ids or the rotary embeddings, read afresh at every call), so a GPT-2, Llama/Mistral-style or
GPT-NeoX layer gives its attention and MLP sites with nothing written per architecture. (A GPT-NeoX layer
with ``use_parallel_residual`` adds both branches to the stream in one addition: one ``attention+mlp`` site.)

The head that reads the stream is the model's final norm followed by its unembedding; it is checked at load
to reproduce the model's logits from the last layer's output.

transformers is an optional extra (``pip install resinspect[hf]``), imported only when an ``hf:`` model is
asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..anatomy import _EXAMINED, install_sites_for_call
from ..errors import ResinspectError

__all__ = ["HF_HINT", "HFCausalLM", "require_transformers", "load_hf", "hf_factory", "hf_tokenizer"]

HF_HINT = "hf: models need the optional transformers package: pip install resinspect[hf]"
# where the final norm sits on the base model, by family (GPT-2, Llama/Mistral/Qwen, GPT-NeoX, OPT, Falcon …)
_NORM_NAMES = ("ln_f", "norm", "final_layer_norm", "final_layernorm", "final_norm", "norm_f")
# the files a saved tokenizer is made of (one of them at least)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
# how many token positions each model may read, by config field
_CONTEXT_FIELDS = ("n_positions", "max_position_embeddings", "n_ctx", "seq_length")


def require_transformers() -> Any:
    """transformers, imported on first use; one line with the install command when missing."""
    try:
        import transformers
    except ImportError:
        raise ResinspectError(HF_HINT) from None
    return transformers


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _source(spec: str) -> str:
    """A folder (expanded) when ``spec`` names one, else ``spec`` as a hub id to find in the local cache."""
    path = Path(spec).expanduser()
    return str(path) if path.exists() else spec


def load_hf(spec: str) -> HFCausalLM:
    """The causal language model ``spec`` (a folder, or a hub id already in the local cache), in float32, with
    its residual sites installed. Raises :class:`ResinspectError` with one line when it cannot be loaded."""
    transformers = require_transformers()
    source = _source(spec)
    path = Path(source)
    if path.is_dir() and not (path / "config.json").is_file():
        raise ResinspectError(f"hf:{spec}: folder {path} has no config.json (save the model with save_pretrained)")
    if not path.exists() and (spec.startswith((".", "/", "~")) or spec.count("/") > 1):
        raise ResinspectError(f"hf:{spec}: no such folder")
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # no "Loading weights" bar in a run's log
    try:
        # eager attention: PyTorch's fused attention has no second derivative (curvature needs one)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
        )
    except (OSError, ValueError, KeyError) as e:
        where = f"folder {source}" if path.exists() else f"'{spec}' in the local Hugging Face cache (offline)"
        raise ResinspectError(
            f"hf:{spec}: could not load a causal language model from {where}: {_first_line(e)}"
        ) from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    return HFCausalLM(model, spec)


def _decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The longest ModuleList of layers of one type: the decoder layers."""
    lists = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(x) for x in m}) == 1
    ]
    if not lists:
        raise ResinspectError(f"{type(model).__name__}: no list of decoder layers found")
    return max(lists, key=lambda item: len(item[1]))


class HFCausalLM(nn.Module):
    """A Hugging Face causal LM as resinspect runs it: token ids ``(B, T)`` in, logits ``(B, T, V)`` out (no
    cache), its decoder layers cut into residual sites, :meth:`resinspect_head` the final norm + unembedding.

    Attributes:
        hf: the transformers model itself.
        source: what ``hf:`` was given.
        vocab: the vocabulary size; ``context``: how many positions it reads (None when its config says not).
        sites: residual sites found per layer; ``unsupported``: why a layer got none (empty when all did).
    """

    hf: Any  # a transformers PreTrainedModel (untyped here: transformers is optional)

    def __init__(self, hf: Any, source: str):
        super().__init__()
        self.hf = hf
        self.source = source
        config = hf.config
        config.use_cache = False
        self.vocab = int(config.vocab_size)
        self.context = next((int(v) for f in _CONTEXT_FIELDS if isinstance(v := getattr(config, f, None), int)), None)
        self.layers_name, layers = _decoder_layers(hf)
        self._head_error: str | None = None
        self.sites: list[int] = []
        self.unsupported: list[str] = []
        self._install(layers)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.hf(input_ids=ids, use_cache=False).logits

    def _install(self, layers: nn.ModuleList) -> None:
        """One short forward to see how the model calls its layers; each layer is cut into sites for such
        calls, and the head is checked against the logits."""
        calls: dict[nn.Module, tuple[tuple, dict[str, Any]]] = {}
        outs: list[torch.Tensor] = []

        def record(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            calls.setdefault(module, (args, kwargs))

        attention = {m: None for layer in layers for m in layer.children() if "attention" in type(m).__name__.lower()}

        def pattern(module: nn.Module, args: tuple, out: Any) -> None:
            attention[module] = out[1] if isinstance(out, tuple) and len(out) > 1 else None

        hooks = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in layers]
        hooks.append(layers[-1].register_forward_hook(lambda m, a, out: outs.append(out)))
        hooks += [m.register_forward_hook(pattern) for m in attention]
        ids = torch.arange(4).remainder(self.vocab).unsqueeze(0)
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                logits = self(ids)
        finally:
            for h in hooks:
                h.remove()
        for i, layer in enumerate(layers):
            args, kwargs = calls.get(layer, ((), {}))
            if not args:  # not called, or handed its stream by keyword: nothing to cut it for
                found: int | str = "not called with its hidden states as the first positional argument"
            else:
                found = install_sites_for_call(layer, args[1:], kwargs)
            if isinstance(found, str):
                self.unsupported.append(f"layer {i}: {found}")
                found = 0
            self.sites.append(found)
        # the levels above the layers hold no residual addition of their own (torch.fx cannot trace them)
        for name, module in self.named_modules():
            if f"hf.{self.layers_name}".startswith(name + ".") or name == "":
                module.__dict__[_EXAMINED] = True
        self._check_head(outs[0] if outs and isinstance(outs[0], torch.Tensor) else None, logits)
        self._mark_heads(attention, ids.shape[1])
        self.train(was)

    def _mark_heads(self, attention: dict[nn.Module, Any], length: int) -> None:
        """Name the heads of each attention module that returned its pattern ``(batch, heads, T, T)``
        (``resinspect_heads``) and the child that reads the heads' outputs side by side
        (``resinspect_head_output``: its last child with a weight matrix whose input is heads x head width),
        for the heads plugin."""
        heads = getattr(self.hf.config, "num_attention_heads", None)
        for module, weights in attention.items():
            if not (isinstance(heads, int) and isinstance(weights, torch.Tensor)):
                continue
            if weights.dim() != 4 or tuple(weights.shape[1:]) != (heads, length, length):
                continue
            projections = [
                name
                for name, child in module.named_children()
                if isinstance(w := getattr(child, "weight", None), torch.Tensor) and w.dim() == 2
            ]
            if projections:
                module.__dict__["resinspect_heads"] = heads
                module.__dict__["resinspect_head_output"] = projections[-1]

    def _final_norm(self) -> nn.Module | None:
        base = getattr(self.hf, "base_model", self.hf)
        return next((m for n in _NORM_NAMES if isinstance(m := getattr(base, n, None), nn.Module)), None)

    def _check_head(self, last: torch.Tensor | None, logits: torch.Tensor) -> None:
        if self._final_norm() is None or self.hf.get_output_embeddings() is None:
            self._head_error = f"{type(self.hf).__name__} has no final norm named {', '.join(_NORM_NAMES)}"
            return
        if last is None:
            self._head_error = "its last decoder layer does not return one tensor"
            return
        with torch.no_grad():
            again = self.resinspect_head()(last)
        if again.shape != logits.shape or not torch.allclose(again, logits, rtol=1e-4, atol=1e-4):
            self._head_error = (
                f"{type(self.hf).__name__}'s logits are not its final norm and unembedding of the last layer's "
                "output (a scaled or capped readout)"
            )

    def resinspect_head(self) -> nn.Module:
        """The final norm followed by the unembedding (the model's own modules): the logits of any stream."""
        from ..readout import NoHead

        if self._head_error:
            raise NoHead(self._head_error)
        norm = self._final_norm()
        assert norm is not None  # checked at load (_head_error)
        return nn.Sequential(norm, self.hf.get_output_embeddings())


def hf_factory(spec: str) -> Callable[..., nn.Module]:
    """A factory for ``hf:<spec>``: the loaded model, checked to read the data's vocabulary (``num_classes``)
    and sequence length (``image_size``)."""

    def factory(in_channels: int = 1, num_classes: int = 0, image_size: int | None = None) -> nn.Module:
        model = load_hf(spec)
        if num_classes > model.vocab:
            raise ResinspectError(
                f"hf:{spec} has a vocabulary of {model.vocab} tokens; the data's has {num_classes} "
                "(for text, the model's own tokenizer is used unless --data-arg tokenizer=... names another)"
            )
        if image_size and model.context and image_size > model.context:
            raise ResinspectError(
                f"hf:{spec} reads at most {model.context} positions; the data's sequences have {image_size} "
                f"(-d length={model.context} or fewer)"
            )
        return model

    return factory


def hf_tokenizer(spec: str) -> Any:
    """The tokenizer saved with ``spec`` (folder or cached hub id), offline; one line when there is none."""
    transformers = require_transformers()
    source = Path(_source(spec))
    if source.is_dir() and not any((source / f).is_file() for f in _TOKENIZER_FILES):
        raise ResinspectError(
            f"tokenizer {spec}: folder {source} holds no tokenizer ({', '.join(_TOKENIZER_FILES[:3])} …); "
            "save one there or name another with --data-arg tokenizer=<folder or hub id>"
        )
    try:
        tok = transformers.AutoTokenizer.from_pretrained(str(source), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ResinspectError(f"tokenizer {spec}: could not load a Hugging Face tokenizer: {_first_line(e)}") from None
    if len(tok) < 2:
        raise ResinspectError(f"tokenizer {spec}: its vocabulary is empty")
    return tok
