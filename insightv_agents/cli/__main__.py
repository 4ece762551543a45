"""``python -m insightv_agents.cli`` (and ``accelerate launch -m insightv_agents.cli``)."""

from insightv_agents.cli.app import app

app()
