"""Supported hybrid ViTs: creation, checkpoint loading and bridge-block discovery.

Every hybrid family timm 1.0.31 carries is supported: MobileViT v1 and v2, EfficientFormer v1 and v2.
Mobile-Former is not part of timm, so it is not offered.
"""
from __future__ import annotations

import importlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from torch import nn

from .errors import HyqError
from .fileio import sha256_file

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DEFAULT_MODEL = "mobilevit_xxs"


@dataclass(frozen=True)
class ModelSpec:
    """A supported model: its timm name, family and canonical (ImageNet) input size."""

    name: str
    family: str
    input_size: int


def _specs() -> dict[str, ModelSpec]:
    families = {
        "mobilevit": (["mobilevit_xxs", "mobilevit_xs", "mobilevit_s"], 256),
        "mobilevitv2": ([f"mobilevitv2_{w:03d}" for w in (50, 75, 100, 125, 150, 175, 200)], 256),
        "efficientformer": (["efficientformer_l1", "efficientformer_l3", "efficientformer_l7"], 224),
        "efficientformerv2": ([f"efficientformerv2_{v}" for v in ("s0", "s1", "s2", "l")], 224),
    }
    return {n: ModelSpec(n, fam, size) for fam, (names, size) in families.items() for n in names}


MODELS: dict[str, ModelSpec] = _specs()


@dataclass(frozen=True)
class ModelInfo:
    """What a loaded model was built from: everything later stages need to reproduce it."""

    name: str
    num_classes: int
    img_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    weights: str | None
    weights_sha256: str | None
    dataset: str | None


def model_spec(name: str) -> ModelSpec:
    """The spec of a supported model, or an error listing the supported ones."""
    if name not in MODELS:
        raise HyqError(f"unknown model {name!r}; supported: {', '.join(MODELS)}")
    return MODELS[name]


def proxy_checkpoint(name: str) -> Path:
    """Path of the embedded Fashion-MNIST proxy checkpoint of a model."""
    return CHECKPOINT_DIR / f"{name}.safetensors"


def build_model(name: str, num_classes: int, img_size: int) -> nn.Module:
    """A randomly initialised timm model, set up for quantization (unfused attention) at `img_size`."""
    spec = model_spec(name)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes, img_size=img_size)
    for module in model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # explicit q@k^T and attn@v, so both matmuls can be quantized
    if spec.family == "efficientformer":
        _set_efficientformer_resolution(model, img_size)
    return model


def _set_efficientformer_resolution(model: nn.Module, img_size: int) -> None:
    """Resize EfficientFormer-v1 attention biases to the token grid of `img_size` (timm fixes it at 7x7)."""
    grid = img_size // 32
    for module in model.modules():
        if type(module).__name__ == "Attention" and hasattr(module, "attention_bias_idxs"):
            heads, cells = module.attention_biases.shape
            if cells == grid * grid:
                continue
            pos = torch.stack(torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")).flatten(1)
            rel = (pos[:, :, None] - pos[:, None, :]).abs()
            module.attention_biases = nn.Parameter(torch.zeros(heads, grid * grid))
            module.attention_bias_idxs = rel[0] * grid + rel[1]
            module.attention_bias_cache = {}


def read_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a safetensors or .pth checkpoint (loaded with weights_only=True)."""
    path = Path(path)
    if not path.is_file():
        raise HyqError(f"checkpoint {path} {'is not a regular file' if path.exists() else 'does not exist'}")
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except HyqError:
        raise
    except Exception as err:  # corrupt or foreign file
        raise HyqError(f"cannot read checkpoint {path}: {str(err).splitlines()[0]}") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict):
        raise HyqError(f"checkpoint {path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in obj.items() if torch.is_tensor(v)}, {}


def _fit_state_dict(model: nn.Module, name: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a checkpoint onto timm's key layout (timm's own filter for original-repo layouts)."""
    module = importlib.import_module(type(model).__module__)
    fit = getattr(module, "checkpoint_filter_fn", None)
    if fit is not None:
        try:
            state = fit(state, model)
        except Exception:  # already in timm layout, or not a layout the filter knows: compared below
            pass
    return state


def _resized_bias_table(table: torch.Tensor, cells: int) -> torch.Tensor | None:
    """An EfficientFormer attention-bias table (heads, g*g), one bias per (|dy|, |dx|) token offset,
    interpolated (bicubic) to `cells` = g'*g' offsets for another input resolution; None if not square."""
    g, g_new = math.isqrt(table.shape[-1]), math.isqrt(cells)
    if g * g != table.shape[-1] or g_new * g_new != cells:
        return None
    grid = table.reshape(1, -1, g, g).float()
    return F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False).reshape(-1, cells)


def load_weights(model: nn.Module, name: str, path: str | Path) -> None:
    """Load a checkpoint into `model`, naming the first key that does not fit. Attention-bias tables of a
    checkpoint trained at another resolution are interpolated to the model's token grid."""
    state, _ = read_state_dict(path)
    state = _fit_state_dict(model, name, state)
    expected = {k: v for k, v in model.state_dict().items()}
    for key, tensor in expected.items():
        if key in state and key.endswith("attention_biases") and state[key].shape != tensor.shape:
            resized = _resized_bias_table(state[key], tensor.shape[-1])
            state[key] = resized if resized is not None else state[key]
        if key not in state:
            if key.endswith("attention_bias_idxs"):
                continue  # derived from the resolution, not learned
            raise HyqError(f"checkpoint {path} does not fit {name}: missing key {key!r}")
        if tuple(state[key].shape) != tuple(tensor.shape):
            raise HyqError(
                f"checkpoint {path} does not fit {name}: {key!r} has shape {tuple(state[key].shape)},"
                f" the model expects {tuple(tensor.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise HyqError(f"checkpoint {path} does not fit {name}: unexpected key {extra[0]!r}")
    model.load_state_dict({k: v for k, v in state.items()}, strict=False)


def _classifier_classes(name: str, state: dict[str, torch.Tensor]) -> int | None:
    probe = build_model(name, num_classes=7, img_size=model_spec(name).input_size)
    for key, tensor in probe.state_dict().items():
        if tensor.ndim >= 1 and tensor.shape[0] == 7 and key in state and key.endswith("weight"):
            return int(state[key].shape[0])
    return None


def check_img_size(img_size: int) -> int:
    """`img_size` if the models can take it (a positive multiple of 32), else a HyqError."""
    if not isinstance(img_size, int) or img_size < 32 or img_size % 32:
        raise HyqError(f"--img-size must be a multiple of 32 (the models downsample by 32), got {img_size}")
    return img_size


def load_model(name: str, weights: str | Path | None = None, img_size: int | None = None
               ) -> tuple[nn.Module, ModelInfo]:
    """A model in eval mode with its weights: `weights`, or the embedded proxy checkpoint; for inputs of
    `img_size` (default: the checkpoint's)."""
    spec = model_spec(name)
    path = Path(weights) if weights is not None else proxy_checkpoint(name)
    if weights is None and not path.is_file():
        raise HyqError(f"no embedded proxy checkpoint for {name}; pass --weights PATH or train one with"
                       f" `python -m hyq_tvm.train --model {name}`")
    state, meta = read_state_dict(path)
    if meta.get("hyq_tvm.model") not in (None, name):
        raise HyqError(f"checkpoint {path} was trained for {meta['hyq_tvm.model']}, not {name}")
    if "hyq_tvm.num_classes" in meta:
        num_classes, checkpoint_size = int(meta["hyq_tvm.num_classes"]), int(meta["hyq_tvm.img_size"])
        mean, std = tuple(json.loads(meta["hyq_tvm.mean"])), tuple(json.loads(meta["hyq_tvm.std"]))
        dataset = meta.get("hyq_tvm.dataset")
    else:
        num_classes = _classifier_classes(name, state) or 1000
        checkpoint_size, dataset = spec.input_size, None
        cfg = timm.models.get_pretrained_cfg(name)
        mean, std = tuple(cfg.mean), tuple(cfg.std)
    if img_size is not None:
        check_img_size(img_size)
    img_size = img_size or checkpoint_size
    model = build_model(name, num_classes, img_size)
    load_weights(model, name, path)
    info = ModelInfo(name, num_classes, img_size, mean, std, str(path), sha256_file(path), dataset)
    return model.eval(), info


@dataclass(frozen=True)
class BridgeBlock:
    """Consecutive sibling modules joining the convolutional and the transformer part of a model.

    `members` run one after another; the output of the last one is the block output at which
    Q-HyViT measures the reconstruction error of every layer inside.
    """

    members: tuple[str, ...]

    @property
    def output(self) -> str:
        return self.members[-1]

    def contains(self, module_name: str) -> bool:
        return any(module_name == m or module_name.startswith(m + ".") for m in self.members)


def _is_attention(module: nn.Module) -> bool:
    return "Attention" in type(module).__name__


def _has_attention(module: nn.Module) -> bool:
    return any(_is_attention(m) for m in module.modules())


def _is_attention_block(module: nn.Module) -> bool:
    return any(_is_attention(child) for child in module.children())


def find_bridge_blocks(model: nn.Module) -> list[BridgeBlock]:
    """Bridge blocks found from module structure, in forward order.

    Two structures occur in timm's hybrids:
    - a hybrid block whose `transformer` child follows convolutions that project the feature map
      into the transformer's input (MobileViT v1/v2): the bridge is those convolutions;
    - a block sequence where the first block with an attention token mixer follows blocks without
      attention (EfficientFormer v1/v2): the bridge is that first attention block.
    """
    bridges = []
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        children = list(module.named_children())
        names = [n for n, _ in children]
        if "transformer" in names and _has_attention(module.transformer):
            before = children[: names.index("transformer")]
            members = tuple(prefix + n for n, c in before if any(True for _ in c.parameters()))
            if members:
                bridges.append(BridgeBlock(members))
        elif isinstance(module, nn.Sequential):
            for (_, prev), (child_name, child) in zip(children, children[1:]):
                if _is_attention_block(child) and not _has_attention(prev):
                    bridges.append(BridgeBlock((prefix + child_name,)))
    return bridges
