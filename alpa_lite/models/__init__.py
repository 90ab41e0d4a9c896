"""The model zoo shared by tests, examples, benchmarks and the CLI.

Flax linen models (`GPT`, `Llama`, `WideResNet`, `MLP`, `SmallCNN`), named sizes from the
papers (`get_preset`), and builders for one training step (`create_train_state`, `make_batch`,
`make_train_step`, `model_flops_per_step`; `build_workload` bundles them).

Example:
    >>> import jax
    >>> from alpa_lite import models
    >>> work = models.build_workload(models.get_preset("gpt-tiny"), 4)
    >>> state, loss = jax.jit(work.train_step)(work.state, work.batch)
"""

from alpa_lite.models.cnn import SmallCNN as SmallCNN
from alpa_lite.models.gpt import GPT as GPT
from alpa_lite.models.gpt import GPTConfig as GPTConfig
from alpa_lite.models.gpt import estimate_gpt_params as estimate_gpt_params
from alpa_lite.models.llama import Llama as Llama
from alpa_lite.models.llama import LlamaConfig as LlamaConfig
from alpa_lite.models.llama import estimate_llama_params as estimate_llama_params
from alpa_lite.models.mlp import MLP as MLP
from alpa_lite.models.presets import PRESETS as PRESETS
from alpa_lite.models.presets import ModelPreset as ModelPreset
from alpa_lite.models.presets import get_preset as get_preset
from alpa_lite.models.train import BatchNormTrainState as BatchNormTrainState
from alpa_lite.models.train import Workload as Workload
from alpa_lite.models.train import build_model as build_model
from alpa_lite.models.train import build_workload as build_workload
from alpa_lite.models.train import count_params as count_params
from alpa_lite.models.train import create_train_state as create_train_state
from alpa_lite.models.train import default_loss as default_loss
from alpa_lite.models.train import default_optimizer as default_optimizer
from alpa_lite.models.train import make_batch as make_batch
from alpa_lite.models.train import make_train_step as make_train_step
from alpa_lite.models.train import model_flops_per_step as model_flops_per_step
from alpa_lite.models.train import with_standard_promotion as with_standard_promotion
from alpa_lite.models.wide_resnet import WideResNet as WideResNet
from alpa_lite.models.wide_resnet import WideResNetConfig as WideResNetConfig
from alpa_lite.models.wide_resnet import estimate_wide_resnet_params as estimate_wide_resnet_params
