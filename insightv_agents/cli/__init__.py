"""The ``insightv`` command line: a small module per command group, over library calls.

- :mod:`~insightv_agents.cli.inference`: ``run``; :mod:`~insightv_agents.cli.serving`: ``serve``;
- :mod:`~insightv_agents.cli.data`: ``synthesize``, ``build-data``;
- :mod:`~insightv_agents.cli.evaluation`: ``eval``, ``compare``;
- :mod:`~insightv_agents.cli.training`: ``train sft | dpo | iterate``;
- :mod:`~insightv_agents.cli.models`: which models a command runs;
- :mod:`~insightv_agents.cli.common`: shared options, the error handler, the progress bar.
"""

from insightv_agents.cli.app import app

__all__ = ["app"]
