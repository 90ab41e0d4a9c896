"""Named model sizes from the papers alpa_lite re-creates, plus tiny sizes for tests.

Output artifact: a `ModelPreset` (family, architecture config, default global batch size).

Sources:

* GPT: the GPT-3 sizes of Alpa (Zheng et al., OSDI'22, Table 4 and §8.1: sequence length 1024,
  vocabulary 51200, global batch 1024), which follow Brown et al. 2020 (Table 2.1) with
  Megatron-LM's padded vocabulary. "gpt-13b" is GPT-3 13B in Megatron-LM's layout (h=5120,
  40 layers, 40 heads; GPT-3's own table says h=5140); Aceso (EuroSys'24) also evaluates a
  GPT-3 13B, but its exact table was not checked for this file. Alpa's 32-GPU size is "gpt-15b"
  (h=5120, 48 layers, 40 heads).
* LLaMA-2: Touvron et al. 2023 (Table 1 and the released configs): vocabulary 32000, context 4096,
  7B: h=4096, 32 layers, 32 heads, ffn 11008; 13B: h=5120, 40 layers, 40 heads, ffn 13824. The
  default batch of 1024 sequences is their 4M-token global batch.
* Wide-ResNet: Alpa Table 4 (depth / base channels / width factor; image 224, 1024 classes, global
  batch 1536 in §8.1), as listed in Alpa's public benchmark suite. "wresnet-500m" appears only in
  that suite (its 2-GPU point). For 13B, an older revision of the suite says depth 50 with width
  factor 32, the later one depth 101 with width factor 16; the later one is used here and is,
  to the best of our recollection, what the paper's table prints (not re-checked against the
  PDF).
  Parameter counts from `estimate_wide_resnet_params` land within 3% of every nominal size.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Literal, Mapping

import jax.numpy as jnp

from alpa_lite.errors import InvalidConfigError
from alpa_lite.models.gpt import GPTConfig, estimate_gpt_params
from alpa_lite.models.llama import LlamaConfig, estimate_llama_params
from alpa_lite.models.wide_resnet import WideResNetConfig

Family = Literal["gpt", "llama", "wresnet"]
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
ModelConfig = GPTConfig | LlamaConfig | WideResNetConfig


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelPreset:
    """A named model size.

    Attributes:
        name: the preset's name, e.g. ``"gpt-1.3b"``.
        family: ``"gpt"``, ``"llama"`` or ``"wresnet"``.
        config: the architecture (`GPTConfig`, `LlamaConfig` or `WideResNetConfig`).
        default_batch_size: global batch size (sequences or images) the source paper trains with.
        nominal_params: the parameter count the name advertises (e.g. ``1.3e9``).

    Example:
        >>> preset = get_preset("gpt-1.3b").with_overrides(num_layers=2, batch_size=8)
        >>> preset.config.num_layers, preset.default_batch_size
        (2, 8)
    """

    name: str
    family: Family
    config: ModelConfig
    default_batch_size: int
    nominal_params: float

    def with_overrides(self, num_layers: int | None = None, batch_size: int | None = None,
                       seq_len: int | None = None, dtype: str | None = None) -> ModelPreset:
        """Returns a copy with fewer/more layers, another batch size, sequence length or
        compute dtype.

        ``num_layers`` is the block count for GPT/LLaMA and the depth (e.g. 50, 101) for
        Wide-ResNet; ``seq_len`` applies to the language models only. ``dtype``
        (``"float32"``, ``"bfloat16"`` or ``"float16"``) is the compute dtype (flax
        ``dtype=``): parameters, gradients and optimizer state stay float32 (flax
        ``param_dtype``), as in mixed-precision training. The name is kept.

        Raises:
            InvalidConfigError: for a non-positive value, a Wide-ResNet ``seq_len``, an
                unknown dtype or an unsupported Wide-ResNet depth.
        """
        for arg, value in (("num_layers", num_layers), ("batch_size", batch_size),
                           ("seq_len", seq_len)):
            if value is not None and value < 1:
                raise InvalidConfigError(f"{arg} must be a positive integer, got {value}.")
        changes: dict[str, int] = {}
        if num_layers is not None:
            changes["num_layers"] = num_layers
        if seq_len is not None:
            if self.family == "wresnet":
                raise InvalidConfigError(
                    f"{self.name!r} is an image model and has no seq_len; override num_layers "
                    "or batch_size instead."
                )
            changes["seq_len"] = seq_len
        if dtype is not None:
            if dtype not in COMPUTE_DTYPES:
                raise InvalidConfigError(
                    f"dtype must be one of {tuple(COMPUTE_DTYPES)}; got {dtype!r}. For example "
                    "dtype='bfloat16' (float32 master weights, half-precision compute).")
            changes["dtype"] = COMPUTE_DTYPES[dtype]
        return dataclasses.replace(
            self,
            config=dataclasses.replace(self.config, **changes),
            default_batch_size=batch_size or self.default_batch_size,
        )


def _gpt(name: str, hidden: int, layers: int, heads: int, nominal: float, *, vocab: int = 51200,
         seq_len: int = 1024, batch: int = 1024) -> ModelPreset:
    config = GPTConfig(vocab, hidden, layers, heads, seq_len)
    return ModelPreset(name=name, family="gpt", config=config, default_batch_size=batch,
                       nominal_params=nominal)


def _llama(name: str, hidden: int, layers: int, heads: int, ffn: int, nominal: float, *,
           vocab: int = 32000, seq_len: int = 4096, batch: int = 1024) -> ModelPreset:
    config = LlamaConfig(vocab, hidden, layers, heads, ffn_size=ffn, seq_len=seq_len)
    return ModelPreset(name=name, family="llama", config=config, default_batch_size=batch,
                       nominal_params=nominal)


def _wresnet(name: str, depth: int, base: int, width: int, nominal: float, *, classes: int = 1024,
             image: int = 224, batch: int = 1536) -> ModelPreset:
    config = WideResNetConfig(depth, width, base, classes, image)
    return ModelPreset(name=name, family="wresnet", config=config, default_batch_size=batch,
                       nominal_params=nominal)


_ALL = [
    # Alpa OSDI'22 Table 4, GPT-3 column: hidden, layers, heads (seq 1024, vocab 51200).
    _gpt("gpt-350m", 1024, 24, 16, 350e6),
    _gpt("gpt-1.3b", 2048, 24, 32, 1.3e9),
    _gpt("gpt-2.6b", 2560, 32, 32, 2.6e9),
    _gpt("gpt-6.7b", 4096, 32, 32, 6.7e9),
    _gpt("gpt-13b", 5120, 40, 40, 13e9),  # GPT-3 13B (Megatron-LM layout); not in Alpa's table.
    _gpt("gpt-15b", 5120, 48, 40, 15e9),  # Alpa's 32-GPU size.
    _gpt("gpt-39b", 8192, 48, 64, 39e9),
    # LLaMA-2 (Touvron et al. 2023): hidden, layers, heads, ffn (vocab 32000, context 4096).
    _llama("llama2-7b", 4096, 32, 32, 11008, 7e9),
    _llama("llama2-13b", 5120, 40, 40, 13824, 13e9),
    # Alpa OSDI'22 Table 4, Wide-ResNet column: depth, base channels, width factor.
    _wresnet("wresnet-250m", 50, 160, 2, 250e6),
    _wresnet("wresnet-500m", 50, 224, 2, 500e6),  # Alpa benchmark suite only (2 GPUs).
    _wresnet("wresnet-1b", 50, 320, 2, 1e9),
    _wresnet("wresnet-2b", 50, 448, 2, 2e9),
    _wresnet("wresnet-4b", 50, 640, 2, 4e9),
    _wresnet("wresnet-6.8b", 50, 320, 16, 6.8e9),
    _wresnet("wresnet-13b", 101, 320, 16, 13e9),
    # Tiny sizes for CPU tests (nominal_params is the exact count).
    _gpt("gpt-tiny", 64, 2, 4, 109_312, vocab=128, seq_len=16, batch=8),
    _llama("llama-tiny", 64, 2, 4, 176, 117_056, vocab=128, seq_len=16, batch=8),
    _wresnet("wresnet-tiny", 16, 4, 2, 44_014, classes=10, image=16, batch=8),
]

PRESETS: Mapping[str, ModelPreset] = types.MappingProxyType({p.name: p for p in _ALL})


FAMILIES = ("gpt", "llama")


def custom_preset(family: str, *, hidden: int, num_layers: int, heads: int,
                  vocab: int | None = None, seq_len: int | None = None, batch: int = 1024,
                  ffn: int | None = None) -> ModelPreset:
    """A model of ``family`` (``"gpt"`` or ``"llama"``) with the given dimensions, for
    planning a model no preset names (`alpa-lite plan --model gpt --hidden ...`).

    Defaults: GPT vocabulary 51200 and sequence 1024 with an MLP of ``4 * hidden`` (``ffn``
    must be a multiple of ``hidden``); LLaMA vocabulary 32000, sequence 4096 and ``ffn``
    required. Grouped-query attention (fewer KV heads) is not modelled.

    Example:
        >>> custom_preset("gpt", hidden=2304, num_layers=24, heads=24, seq_len=2048).config.mlp_ratio
        4
    """
    for name, value in (("hidden", hidden), ("num_layers", num_layers), ("heads", heads),
                        ("batch", batch), ("vocab", vocab), ("seq_len", seq_len),
                        ("ffn", ffn)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise InvalidConfigError(f"--{name.replace('_', '-')} must be a positive integer; "
                                     f"got {value!r}.")
    if hidden % heads:
        raise InvalidConfigError(
            f"--heads {heads} must divide --hidden {hidden} (head size hidden / heads).")
    name = f"{family}-h{hidden}-l{num_layers}"
    if family == "gpt":
        if ffn is not None and ffn % hidden:
            raise InvalidConfigError(
                f"GPT's MLP width is a multiple of hidden; --ffn {ffn} is not a multiple of "
                f"--hidden {hidden}. Leave --ffn out for 4 x hidden.")
        config = GPTConfig(vocab or 51200, hidden, num_layers, heads, seq_len or 1024,
                           mlp_ratio=(ffn // hidden) if ffn else 4)
    elif family == "llama":
        if ffn is None:
            raise InvalidConfigError(
                "--model llama needs --ffn (the SwiGLU width, e.g. 11008 for LLaMA-2 7B).")
        config = LlamaConfig(vocab or 32000, hidden, num_layers, heads, ffn_size=ffn,
                             seq_len=seq_len or 4096)
    else:
        raise InvalidConfigError(
            f"--model with dimension flags takes a family, one of {FAMILIES}; got {family!r}.")
    count = estimate_gpt_params(config) if family == "gpt" else estimate_llama_params(config)
    return ModelPreset(name=name, family=family, config=config, default_batch_size=batch,
                       nominal_params=float(count))


def get_preset(name: str) -> ModelPreset:
    """Returns the preset called ``name``.

    Raises:
        InvalidConfigError: if there is no such preset; the message lists the valid names.

    Example:
        >>> get_preset("gpt-350m").config.hidden_size
        1024
    """
    try:
        return PRESETS[name]
    except KeyError:
        raise InvalidConfigError(
            f"Unknown model preset {name!r}. Valid names: {', '.join(PRESETS)}."
        ) from None
