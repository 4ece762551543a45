"""The ``insightv`` command line: a small module per command group, over library calls.

- :mod:`~insightv_agents.cli.inference`: ``run``; :mod:`~insightv_agents.cli.serving`: ``serve``;
- :mod:`~insightv_agents.cli.data`: ``synthesize``, ``build-data``;
- :mod:`~insightv_agents.cli.evaluation`: ``eval``, ``compare``, ``lmms-task``;
- :mod:`~insightv_agents.cli.training`: ``train sft | dpo | iterate | grpo | loop``;
- :mod:`~insightv_agents.cli.common`: shared options, the error handler, the progress bar.

Which models a command runs, and the method over them, is :mod:`insightv_agents.methods`.
"""

from insightv_agents.cli.app import app

__all__ = ["app"]
