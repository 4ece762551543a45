"""``insightv convert``: a released checkpoint in the LLaVA repository's layout to a
transformers folder that ``insightv run --local-model`` and ``insightv serve`` load."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from insightv_agents.cli.common import command_errors
from insightv_agents.errors import InsightVError


def convert(
    source: Annotated[str, typer.Option(
        help="A LLaVA-NeXT checkpoint folder in the LLaVA repository's layout (e.g. a "
             "released Insight-V LLaMA-3 agent), as safetensors.")],
    out: Annotated[str, typer.Option(help="New folder for the transformers model.")],
    role: Annotated[str, typer.Option(
        help="The agent's role in its card: reasoning, summary or both.")] = "reasoning",
    vision_tower: Annotated[str | None, typer.Option(
        help="The transformers CLIP folder of its vision tower (needed when the checkpoint "
             "holds no vision tower weights, or names a tower not built in).")] = None,
) -> None:
    """Convert a LLaVA-NeXT checkpoint (LLaVA repository layout) to transformers'
    LlavaNextForConditionalGeneration, with an agent card for the Insight-V reference
    formats."""
    from insightv_agents.convert import convert_llava_next

    console = Console()
    with command_errors(console):
        if role not in ("reasoning", "summary", "both"):
            raise InsightVError(f"--role must be reasoning, summary or both, not {role!r}.")
        with console.status(f"converting {source}"):
            target = convert_llava_next(source, out, vision_tower=vision_tower,
                                        role=role)  # type: ignore[arg-type]
    console.print(f"{target}: serve it with `insightv serve --model {target}` or run it with "
                  f"`insightv run --local-model {target}`")
