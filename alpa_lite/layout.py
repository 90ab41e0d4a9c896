"""Named layouts: the parallel configuration a user runs today, to be priced as it is.

A `Layout` is Megatron-LM's flags (``--tensor-model-parallel-size``, ``--pipeline-model-
parallel-size``, ``--micro-batch-size``, the schedule, activation recomputation) or a
single-mesh method (data parallel, ZeRO-2/3) with its micro-batch size. `simulate.simulate`
prices it on a cluster without searching; `alpa-lite plan --method megatron --tp 8 --pp 4`
and `alpa-lite plan --layout file.json` are the command-line forms. A layout file is this
module's JSON (`Layout.to_dict`) or the JSON `alpa-lite plan --json` writes (its ``layout``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Mapping

from alpa_lite.errors import InvalidConfigError
from alpa_lite.pipeline_model.schedules import DEFAULT_VIRTUAL_STAGES, ScheduleKind

LAYOUT_METHODS = ("megatron", "dp", "zero2", "zero3")
SCHEDULES = tuple(kind.value for kind in ScheduleKind)
REMAT_MODES = ("off", "layer", "auto")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Layout:
    """A fixed parallel configuration.

    Attributes:
        method: ``"megatron"`` (tensor x pipeline x data parallel), ``"dp"``, ``"zero2"`` or
            ``"zero3"``.
        tp: tensor-parallel degree (Megatron only; within a host).
        pp: pipeline stages (Megatron only; the blocks are split evenly).
        dp: data-parallel degree; None: the devices left, ``devices / (tp * pp)``.
        micro_batch_size: sequences per micro-batch on each data-parallel replica
            (gradient accumulation for the single-mesh methods); None lets the pricing pick
            the fastest of 1, 2, 4, 8 that fits (Megatron), or no accumulation (dp, ZeRO).
        schedule: the pipeline schedule, ``"1f1b"``, ``"gpipe"``, ``"interleaved-1f1b"``
            (Megatron's ``--num-layers-per-virtual-pipeline-stage``) or ``"zb-h1"``.
        virtual_stages: model chunks per stage for ``"interleaved-1f1b"`` (None: 2).
        remat: ``"off"``, ``"layer"`` (recompute every block's forward in the backward pass)
            or ``"auto"`` (the faster of the two that fits memory).

    Example:
        >>> Layout(method="megatron", tp=8, pp=4, micro_batch_size=1).to_dict()["tp"]
        8
    """

    method: str
    tp: int = 1
    pp: int = 1
    dp: int | None = None
    micro_batch_size: int | None = None
    schedule: str = "1f1b"
    remat: str = "off"
    virtual_stages: int | None = None

    def __post_init__(self):
        if self.method not in LAYOUT_METHODS:
            raise InvalidConfigError(
                f"A layout's method must be one of {LAYOUT_METHODS}; got {self.method!r}. "
                "(method 'auto' searches; it is not a layout.)")
        for name in ("tp", "pp", "dp", "micro_batch_size", "virtual_stages"):
            value = getattr(self, name)
            if value is None and name in ("dp", "micro_batch_size", "virtual_stages"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidConfigError(
                    f"Layout {name} must be a positive integer; got {value!r}. Use e.g. "
                    f"{name}=1.")
        if self.schedule not in SCHEDULES:
            raise InvalidConfigError(
                f"Layout schedule must be one of {SCHEDULES}; got {self.schedule!r}.")
        if self.remat not in REMAT_MODES:
            raise InvalidConfigError(
                f"Layout remat must be one of {REMAT_MODES}; got {self.remat!r}.")
        if self.virtual_stages not in (None, 1) and self.schedule != "interleaved-1f1b":
            raise InvalidConfigError(
                f"Layout virtual_stages={self.virtual_stages} needs schedule "
                f"'interleaved-1f1b'; got {self.schedule!r}.")
        if self.method != "megatron" and (self.tp, self.pp) != (1, 1):
            raise InvalidConfigError(
                f"--tp/--pp are Megatron's; method {self.method!r} runs on one mesh, got "
                f"tp={self.tp}, pp={self.pp}. Use method='megatron', or leave tp and pp at 1.")

    @property
    def chunks(self) -> int:
        """Model chunks per pipeline stage (2 by default when interleaved, else 1)."""
        if self.schedule == "interleaved-1f1b":
            return self.virtual_stages or DEFAULT_VIRTUAL_STAGES
        return 1

    def data_parallel(self, num_devices: int) -> int:
        """The data-parallel degree on ``num_devices`` devices (checks that they divide)."""
        model = self.tp * self.pp
        if self.dp is None and num_devices % model:
            raise InvalidConfigError(
                f"The cluster's {num_devices} devices do not divide into tp={self.tp} x "
                f"pp={self.pp} = {model} per data-parallel replica. Choose tp x pp dividing "
                f"{num_devices}.")
        dp = self.dp if self.dp is not None else num_devices // model
        if model * dp != num_devices:
            raise InvalidConfigError(
                f"Layout tp={self.tp} x pp={self.pp} x dp={self.dp if self.dp else dp} uses "
                f"{model * dp} devices; the cluster has {num_devices}. Choose degrees whose "
                f"product is {num_devices} (or leave dp out).")
        return dp

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        if data["virtual_stages"] is None:
            del data["virtual_stages"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> "Layout":
        """A layout from its JSON, or from `alpa-lite plan --json` output (its ``layout``)."""
        if not isinstance(data, Mapping):
            raise InvalidConfigError(f"A layout is a JSON object; got {type(data).__name__}.")
        if "layout" in data:
            if data["layout"] is None:
                raise InvalidConfigError(
                    f"This plan (method {data.get('method')!r}) is a searched plan, not a "
                    "named layout; only megatron, dp, zero2 and zero3 results can be fed back. "
                    "Write the layout by hand, e.g. {\"method\": \"megatron\", \"tp\": 8, "
                    "\"pp\": 4}.")
            data = data["layout"]
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown or "method" not in data:
            raise InvalidConfigError(
                f"A layout needs 'method' and may have {sorted(fields - {'method'})}; got "
                f"keys {sorted(data)}" + (f" (unknown: {unknown})" if unknown else "") + ".")
        return cls(**data)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Layout":
        try:
            with open(path) as f:
                return cls.from_dict(json.load(f))
        except FileNotFoundError as err:
            raise InvalidConfigError(
                f"Layout file {os.fspath(path)!r} does not exist. Write one like "
                '{"method": "megatron", "tp": 8, "pp": 4, "micro_batch_size": 1}, or pass '
                "the JSON of `alpa-lite plan --json`.") from err
        except json.JSONDecodeError as err:
            raise InvalidConfigError(
                f"Layout file {os.fspath(path)!r} is not JSON ({err}).") from err
