"""Pretrained Hugging Face encoders as module types (``hf_encoder``), and what they save.

A text model (BERT, RoBERTa, DeBERTa, ...) reads token ids and their mask; a vision model
(ResNet, ViT, ConvNeXt, ...) reads pixels. Either is loaded from a directory ``save_pretrained``
wrote (or a hub id when the network is there), or built fresh from a config mapping. Its output
width comes from its config (:attr:`HFEncoder.width`), so a head reads it with
``in_features: {width_of: <encoder>}`` instead of a copied number.

What a checkpoint holds: the encoder's trainable weights and buffers. The weights that do not
train (``freeze: true``) of an encoder loaded from ``path`` are left out; in their place the
checkpoint keeps the path and a fingerprint of them, and loading refuses a base whose weights
differ (``docs/pretrained.md``). ``transformers`` (``mtlgraph[hf]``) is imported only here, and
only when an encoder is built.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from mtlgraph._io import import_extra
from mtlgraph.exceptions import CheckpointError, ConfigError

Pooling = Literal["cls", "mean", "pooler", "none"]
"""How an encoder's sequence (or feature map) becomes one vector per row."""


def transformers_module(what: str) -> Any:
    """``transformers``, or an ImportError naming the ``hf`` extra."""
    return import_extra(what, "hf", "transformers")[0]


def model_config(
    path: str | None, config: Mapping[str, Any] | None, where: str = "hf_encoder"
) -> Any:
    """The ``transformers`` config of a model directory / hub id, or of a config mapping.

    Raises:
        ConfigError: Neither or both given, a directory without ``config.json``, a missing
            directory, a mapping without a known ``model_type``.
    """
    tf = transformers_module(f"{where} (a Hugging Face model)")
    if (path is None) == (config is None):
        raise ConfigError([f"{where}: give 'path' (a model directory) or 'config', one of them"])
    if config is not None:
        spec = dict(config)
        model_type = spec.pop("model_type", None)
        try:
            return tf.AutoConfig.for_model(model_type, **spec)
        except (ValueError, TypeError) as e:
            raise ConfigError(
                [
                    f"{where}: config: a mapping with 'model_type' (bert, roberta, resnet, vit...) "
                    f"and that model's settings; transformers says: {e}"
                ]
            ) from None
    assert path is not None
    local = Path(path)
    if local.is_file():
        hint = (
            f" ('{local.parent}', which holds config.json)"
            if (local.parent / "config.json").is_file()
            else ""
        )
        raise ConfigError(
            [
                f"{where}: path '{path}' is a file, not a model directory: name the directory "
                f"model.save_pretrained(directory) wrote{hint}"
            ]
        )
    if local.is_dir() and not (local / "config.json").is_file():
        raise ConfigError(
            [
                f"{where}: path '{path}' is not a model directory: it has no config.json "
                "(write one with model.save_pretrained(directory))"
            ]
        )
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise ConfigError([f"{where}: path '{path}': no such directory"])
    try:
        return tf.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ConfigError(
            [
                f"{where}: path '{path}' is neither a model directory nor a hub id this machine "
                f"can fetch (offline?): {e}"
            ]
        ) from None


def config_width(cfg: Any) -> int:
    """The output width of a model's config: ``hidden_size`` (text, ViT), else the last of
    ``hidden_sizes`` (ResNet, ConvNeXt)."""
    sizes = getattr(cfg, "hidden_sizes", None)
    if sizes:
        return int(sizes[-1])
    return int(cfg.hidden_size)


class HFEncoder(nn.Module):
    """A Hugging Face ``AutoModel`` as one module of the graph: ids and mask, or pixels, in;
    one vector per row (or the whole sequence) out.

    Args:
        path: A directory ``save_pretrained`` wrote (relative to the config file in YAML), or
            a hub id when the network is there.
        config: Instead of ``path``: a fresh, randomly initialised model from a config mapping,
            ``{model_type: bert, hidden_size: 32, ...}``.
        pooling: ``cls`` (the first token), ``mean`` (over the attention mask; over height and
            width for a feature map), ``pooler`` (the model's pooler output), ``none`` (the
            sequence ``(B, L, width)`` or feature map).
        freeze: Its weights do not train (``requires_grad`` off, batch-norm statistics kept as
            loaded); checkpoints then leave them out and keep ``path`` and a fingerprint.

    Raises:
        ConfigError: Neither or both of ``path`` and ``config``, a directory that is no model,
            a pooling the model cannot do.

    Example:
        >>> import torch
        >>> from mtlgraph.graph.pretrained import HFEncoder
        >>> enc = HFEncoder(config={"model_type": "bert", "vocab_size": 50, "hidden_size": 8,
        ...     "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 16})
        >>> ids, mask = torch.tensor([[2, 7, 3, 0]]), torch.tensor([[True, True, True, False]])
        >>> enc.width, enc(ids, mask).shape
        (8, torch.Size([1, 8]))
    """

    path_arguments: ClassVar[tuple[str, ...]] = ("path",)
    """Arguments a config file gives relative to its own directory."""
    weights_argument: ClassVar[str] = "path"
    """The argument its weights come from: a config's ``init_from`` is refused for it."""

    def __init__(
        self,
        path: str | None = None,
        config: dict[str, Any] | None = None,
        pooling: Pooling = "mean",
        freeze: bool = False,
    ) -> None:
        super().__init__()
        tf = transformers_module("hf_encoder (a Hugging Face model)")
        cfg = model_config(path, config)
        self.path = None if path is None else str(path)
        self.pooling = pooling
        self.freeze = freeze
        if path is not None:
            try:
                self.model = tf.AutoModel.from_pretrained(path)
            except OSError as e:  # a config.json without weights, a torn weights file
                raise ConfigError(
                    [
                        f"hf_encoder: path '{path}' holds a model config but no weights it can "
                        f"load ({e}); save the model with model.save_pretrained(directory)"
                    ]
                ) from None
        else:
            self.model = tf.AutoModel.from_config(cfg)
        self.text = self.model.main_input_name == "input_ids"
        self.width = config_width(self.model.config)
        self._check_pooling()
        if freeze:
            self.model.requires_grad_(False)
        self._fingerprints: dict[tuple[Any, ...], str] = {}
        self.register_load_state_dict_pre_hook(_fill_frozen)

    def _check_pooling(self) -> None:
        problems = []
        if self.pooling not in ("cls", "mean", "pooler", "none"):
            problems.append(f"pooling must be cls, mean, pooler or none, got {self.pooling!r}")
        if self.pooling == "pooler" and getattr(self.model, "pooler", True) is None:
            problems.append("pooling 'pooler': this model has no pooler (use cls or mean)")
        maps = getattr(self.model.config, "hidden_sizes", None) is not None
        if self.pooling == "cls" and maps:
            problems.append(
                f"pooling 'cls': a {self.model.config.model_type} model gives a feature map, "
                "not a sequence with a first token (use mean or pooler)"
            )
        if problems:
            raise ConfigError([f"hf_encoder: {p}" for p in problems])

    # ------------------------------------------------------------ what the model is

    @property
    def vocab_size(self) -> int | None:
        """Rows of a text model's input embedding (ids must be below it); ``None`` for vision."""
        if not self.text:
            return None
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def image_size(self) -> int | None:
        """The one image side a model accepts (ViT), or ``None`` when any size does."""
        size = getattr(self.model.config, "image_size", None)
        return None if size is None or self.text or _any_size(self.model) else int(size)

    @property
    def num_channels(self) -> int | None:
        """The image channels a vision model reads."""
        return None if self.text else int(getattr(self.model.config, "num_channels", 3))

    # ------------------------------------------------------------ forward

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Token ids ``(B, L)`` and their mask (True = a real token), or pixels ``(B, C, H, W)``."""
        if self.text:
            ids = inputs.long()
            pad = self.model.config.pad_token_id
            if mask is not None and pad not in (None, 0):
                ids = ids.masked_fill(~mask.bool(), int(pad))  # the batch pads with 0
            attention = mask.long() if mask is not None else None
            out = self.model(input_ids=ids, attention_mask=attention)
        else:
            out = self.model(pixel_values=inputs)
        return self.pool(out, mask)

    def pool(self, out: Any, mask: torch.Tensor | None) -> torch.Tensor:
        """One vector per row of a model output, as ``pooling`` says."""
        hidden = out.last_hidden_state
        if self.pooling == "none":
            return hidden
        if self.pooling == "pooler":
            return out.pooler_output.flatten(1)
        if hidden.ndim == 4:  # a feature map (B, C, H, W)
            return hidden.mean(dim=(2, 3))
        if self.pooling == "cls":
            return hidden[:, 0]
        if mask is None:
            return hidden.mean(dim=1)
        weights = mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)

    def train(self, mode: bool = True) -> HFEncoder:
        super().train(mode)
        if self.freeze:  # batch-norm statistics of a frozen encoder stay as loaded
            for m in self.model.modules():
                if getattr(m, "track_running_stats", False):
                    m.eval()
        return self

    # ------------------------------------------------------------ what a checkpoint holds

    def omitted(self) -> list[str]:
        """Names (below ``model.``) of the weights checkpoints leave out: those that do not
        train, when the encoder can reload them from its ``path``."""
        if self.path is None:
            return []
        return [n for n, p in self.model.named_parameters() if not p.requires_grad]

    def fingerprint(self, names: list[str] | None = None) -> str:
        """A hash of the weights ``names`` (default :meth:`omitted`): equal hashes, equal
        weights. Cached until one of them changes in place."""
        names = self.omitted() if names is None else names
        params = dict(self.model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            return f"missing:{','.join(missing[:3])}"
        key = tuple((n, id(params[n]), params[n]._version) for n in names)
        found = self._fingerprints.get(key)
        if found is None:
            digest = hashlib.blake2b(digest_size=16)
            for n in names:
                t = params[n].detach().cpu().contiguous()
                digest.update(f"{n}:{t.dtype}:{tuple(t.shape)};".encode())
                digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            found = self._fingerprints[key] = digest.hexdigest()
        return found

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        out = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for name in self.omitted():
            out.pop(f"{prefix}model.{name}", None)
        return out

    def get_extra_state(self) -> dict[str, Any]:
        """The base's path and the fingerprint of the weights left out of the checkpoint."""
        names = self.omitted()
        return {"path": self.path, "omitted": names, "fingerprint": self.fingerprint(names)}

    def set_extra_state(self, state: Any) -> None:
        problems = self.extra_state_problems(state)
        if problems:
            raise CheckpointError("; ".join(problems))

    def extra_state_problems(self, state: Any) -> list[str]:
        """Why a checkpoint's extra state (:meth:`get_extra_state`) does not fit this encoder:
        it left out weights this encoder cannot restore, or restores different ones."""
        if not isinstance(state, Mapping) or not state.get("omitted"):
            return []
        names = [str(n) for n in state["omitted"]]
        if self.path is None:
            return [
                f"the checkpoint left out {len(names)} frozen weights of the encoder loaded from "
                f"'{state.get('path')}', and this encoder is built from a config: declare it "
                "with that path"
            ]
        ours = self.fingerprint(names)
        if ours != state.get("fingerprint"):
            return [
                f"the checkpoint was trained on the pretrained encoder '{state.get('path')}' "
                f"(fingerprint {state.get('fingerprint')}), and '{self.path}' holds other "
                f"weights (fingerprint {ours}): load it with the model directory it was "
                "trained on"
            ]
        return []


def _any_size(model: nn.Module) -> bool:
    """Whether a vision model takes any image size (convolutions with global pooling)."""
    return getattr(model.config, "hidden_sizes", None) is not None


def _fill_frozen(
    module: nn.Module,
    state_dict: dict[str, Any],
    prefix: str,
    *args: Any,
) -> None:
    """Before loading: the weights a checkpoint left out are taken from the module itself
    (they are the pretrained ones), so that a strict load sees every key."""
    assert isinstance(module, HFEncoder)
    extra = state_dict.get(f"{prefix}_extra_state")
    names = extra.get("omitted", []) if isinstance(extra, Mapping) else module.omitted()
    params = dict(module.model.named_parameters())
    for name in names:
        key = f"{prefix}model.{name}"
        if key not in state_dict and name in params:
            state_dict[key] = params[name].detach()


__all__ = ["HFEncoder", "Pooling", "config_width", "model_config", "transformers_module"]
