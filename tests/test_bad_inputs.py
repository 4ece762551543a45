"""Every case of the bad-input catalogue (tests/catalogue.py) gets its typed error, naming
what to fix, before any model or server is called."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from bad_inputs import ACCEPTED, Accepted, Case, Ctx
from catalogue import CASES
from helpers import FakeOpenAIServer
from PIL import Image


@pytest.fixture(scope="module")
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(lambda body: "unused") as running:
        yield running


def test_the_catalogue_has_at_least_40_distinct_cases() -> None:
    assert len(CASES) >= 150
    assert len({(case.surface, case.what) for case in CASES}) == len(CASES)
    commands = {case.surface for case in CASES if case.surface.startswith("insightv ")}
    assert {"insightv run", "insightv serve", "insightv synthesize", "insightv build-data",
            "insightv train sft", "insightv eval", "insightv compare"} <= commands


@pytest.mark.parametrize("case", CASES, ids=lambda case: f"{case.surface}: {case.what}")
def test_bad_input_gets_a_typed_error_before_any_model_call(
        case: Case, server: FakeOpenAIServer, tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, server.url)
    before = len(server.requests)
    with pytest.raises(case.error) as caught:
        case.call(ctx)
    assert case.says.lower() in str(caught.value).lower()
    assert ctx.model.calls == [] and len(server.requests) == before


@pytest.mark.parametrize("accepted", ACCEPTED, ids=lambda accepted: accepted.what)
def test_unusual_but_valid_images_reach_the_model_as_rgb(accepted: Accepted,
                                                         tmp_path: Path) -> None:
    ctx = Ctx(tmp_path, "http://127.0.0.1:9/v1")
    out = ctx.ask(accepted.data())
    assert out["status"] == "ok"
    sent = [part for message in ctx.model.calls[0] if isinstance(message.content, list)
            for part in message.content if part.get("type") == "image_url"]
    url = sent[0]["image_url"]["url"]
    assert url.startswith("data:image/")
    image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert image.mode == "RGB" and image.size[0] >= 1
