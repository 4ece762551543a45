"""Launch configurations for multi-GPU training, as ``accelerate launch --config_file``
files: ``ddp`` (a full copy of the model per GPU), ``zero2`` and ``zero3`` (DeepSpeed ZeRO
stages 2 and 3), ``fsdp`` (PyTorch FSDP2). ``insightv train launch-config NAME`` prints a
file's path; the training guide says which to pick for which model size.

>>> sorted(LAUNCH_CONFIGS)
['ddp', 'fsdp', 'zero2', 'zero3']
>>> launch_config("zero3").name
'deepspeed-zero3.yaml'
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from insightv_agents.errors import ConfigError

LAUNCH_CONFIGS = {"ddp": "ddp.yaml", "zero2": "deepspeed-zero2.yaml",
                  "zero3": "deepspeed-zero3.yaml", "fsdp": "fsdp.yaml"}


def launch_config(name: str) -> Path:
    """The path of the shipped ``accelerate`` config file ``name`` (:data:`LAUNCH_CONFIGS`).

    Raises:
        ConfigError: for an unknown name.
    """
    if name not in LAUNCH_CONFIGS:
        raise ConfigError(f"unknown launch config {name!r}: {', '.join(LAUNCH_CONFIGS)}.")
    return Path(str(files(__name__) / LAUNCH_CONFIGS[name]))
