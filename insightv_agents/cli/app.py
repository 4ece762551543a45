"""The ``insightv`` application: every command, each from its own module."""

from __future__ import annotations

import typer

from insightv_agents.cli import conversion, data, evaluation, inference, serving, training

app = typer.Typer(help="Insight-V multi-agent visual reasoning.", no_args_is_help=True,
                  add_completion=False, rich_markup_mode="markdown")


@app.callback()
def main() -> None:
    """Insight-V multi-agent visual reasoning."""


app.command("run")(inference.run)
app.command("serve")(serving.serve)
app.command("synthesize")(data.synthesize)
app.command("build-data")(data.build_data)
app.command("eval")(evaluation.eval_command)
app.command("compare")(evaluation.compare)
app.command("lmms-task")(evaluation.lmms_task)
app.command("convert")(conversion.convert)
app.add_typer(training.app, name="train")
