"""Our methods inside the standard evaluation harnesses.

- :mod:`insightv_agents.harnesses.lmms_eval`: the ``insightv`` and ``llava_cot`` models of
  lmms-eval, registered through its ``lmms_eval.models`` entry point (extra
  ``insightv-agents[lmms-eval]``).
- :mod:`insightv_agents.harnesses.vlmevalkit`: a model class with VLMEvalKit's model interface,
  and the lines that register it in VLMEvalKit's ``config.py``.
- :mod:`insightv_agents.harnesses.agent`: what both run: a method of ``insightv eval``
  answering the harness's questions concurrently, each answer in the form the harness's
  scorer reads, and every prediction (reasoning, verdict, search) kept in a folder of ours.
- :mod:`insightv_agents.harnesses.lmms_task`: an lmms-eval task over a dataset of ours
  (``insightv lmms-task``).
"""

from __future__ import annotations

from typing import Any


def lmms_eval_models() -> list[Any]:
    """Our models' manifests for lmms-eval's model registry: the ``lmms_eval.models`` entry
    point of the ``lmms-eval`` extra (lmms-eval calls it; the classes load when used)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    where = "insightv_agents.harnesses.lmms_eval"
    return [ModelManifest(model_id="insightv", simple_class_path=f"{where}.InsightV"),
            ModelManifest(model_id="llava_cot", simple_class_path=f"{where}.LlavaCoT")]
