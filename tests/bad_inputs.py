"""The bad-input catalogue: malformed inputs across the Python API and every CLI command.

Each :class:`Case` is one bad input and what the library must answer: a typed error whose
message names what to fix, raised before any model is called. ``tests/catalogue.py``
gathers them with the cases of ``bad_inputs_files.py``, ``bad_inputs_options.py`` and
``bad_inputs_images.py``; ``tests/test_bad_inputs.py`` runs them all and
``scripts/reliability.py`` runs them again to write the tables of ``docs/reliability.md``.
Inputs the library accepts on purpose (image modes it converts) are in :data:`ACCEPTED`.
"""

from __future__ import annotations

import io
import json
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import role_of, step, verdict, write_output
from PIL import Image
from typer.testing import CliRunner

from insightv_agents import create_insightv_graph
from insightv_agents.errors import ConfigError, InsightVError, InvalidInputError
from insightv_agents.images import ImagePolicy, load_images
from insightv_agents.testing import ScriptedChatModel


class CommandRefused(InsightVError):
    """A CLI command exited with status 2 (a usage or input error); its output is the
    message."""


def _agents(messages: list[Any]) -> str:
    """Both agents' replies: one reasoning step, then a verdict answering "3"."""
    return verdict("3") if role_of(messages) == "summary" else step("look", action="summary")


@dataclass
class Ctx:
    """What a case may use: a scratch folder, a model that counts its calls, and the URL of
    a loopback OpenAI-compatible server that counts its requests."""

    tmp: Path
    url: str
    model: ScriptedChatModel = field(default_factory=lambda: ScriptedChatModel(
        [_agents], cycle=True))

    def graph(self, **options: Any) -> Any:
        return create_insightv_graph(reasoner=self.model, **options).compile()

    def ask(self, image: Any, question: Any = "What is shown?", **options: Any) -> Any:
        return self.graph(**options).invoke({"image": image, "question": question})

    def file(self, name: str, data: bytes | str) -> str:
        path = self.tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            path.write_text(data)
        else:
            path.write_bytes(data)
        return str(path)

    def data(self, *rows: Any, name: str = "data.jsonl") -> str:
        """A dataset: one good row (image ``good.png``), then ``rows`` (objects or raw
        lines)."""
        self.file("d/good.png", png())
        lines = [json.dumps({"id": "good", "image": "good.png", "question": "q", "answer": "1"})]
        lines += [row if isinstance(row, str) else json.dumps(row) for row in rows]
        return self.file(f"d/{name}", "\n".join(lines) + "\n")

    def pickled(self) -> str:
        """A model folder whose weights are a pickle (``pytorch_model.bin``) only."""
        self.file("pickled/config.json", '{"model_type": "idefics3"}')
        weights = self.file("pickled/pytorch_model.bin", b"\x80\x04not really a pickle")
        return str(Path(weights).parent)

    def remote_code(self) -> str:
        """A model folder whose architecture is code shipped in the folder (``auto_map``)."""
        self.file("remote/config.json", json.dumps({
            "model_type": "sneaky", "auto_map": {"AutoConfig": "configuration_sneaky.Config",
                                                 "AutoModel": "modeling_sneaky.Model"}}))
        self.file("remote/configuration_sneaky.py", "raise SystemExit('remote code ran')\n")
        self.file("remote/model.safetensors", b"")
        return str(self.tmp / "remote")

    def records(self) -> str:
        """A synthesis output folder (two questions, three scored paths each)."""
        return str(write_output(self.tmp / "synthesis", {"q1": [(90, True), (20, False),
                                                                (60, True)],
                                                         "q2": [(80, True)] * 3}))

    def cli(self, *args: str) -> str:
        from insightv_agents.cli import app

        result = CliRunner().invoke(app, list(args))
        output = " ".join(result.output.split())
        if result.exit_code == 2:
            raise CommandRefused(output)
        raise AssertionError(f"exit code {result.exit_code}, not 2: {output[-2000:]}")


@dataclass(frozen=True)
class Case:
    """One bad input: where it goes in, what it is, the error expected, and a fragment of
    the message (what to fix)."""

    surface: str
    what: str
    error: type[Exception]
    says: str
    call: Callable[[Ctx], Any]


def png(size: tuple[int, int] = (16, 12), mode: str = "RGB", fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format=fmt)
    return buffer.getvalue()


def noise(side: int = 64) -> bytes:
    """A PNG of random pixels (it does not compress)."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), random.Random(0).randbytes(side * side * 3)).save(
        buffer, format="PNG")
    return buffer.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds almost nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return len(data).to_bytes(4, "big") + body + zlib.crc32(body).to_bytes(4, "big")
    header = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) +
            chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b""))


def bomb() -> bytes:
    """A 1 KB-ish PNG that decodes to 64 million pixels."""
    buffer = io.BytesIO()
    Image.new("1", (8000, 8000)).save(buffer, format="PNG")
    return buffer.getvalue()


RUN = ("run", "--base-url")
IMAGE = InvalidInputError

CASES: list[Case] = [
    # --- images, through graph.invoke ---
    Case("graph.invoke image", "missing (None)", IMAGE, "`image` is required",
         lambda c: c.ask(None)),
    Case("graph.invoke image", "a path that does not exist", IMAGE, "no such file",
         lambda c: c.ask(str(c.tmp / "nope.png"))),
    Case("graph.invoke image", "a folder", IMAGE, "not a regular file",
         lambda c: c.ask(str(c.tmp))),
    Case("graph.invoke image", "an empty file (0 bytes)", IMAGE, "empty (0 bytes)",
         lambda c: c.ask(c.file("empty.png", b""))),
    Case("graph.invoke image", "a text file named .png", IMAGE, "not an image",
         lambda c: c.ask(c.file("text.png", b"hello, I am not a picture"))),
    Case("graph.invoke image", "a truncated PNG", IMAGE, "corrupt or truncated",
         lambda c: c.ask(png((64, 64))[:60])),
    Case("graph.invoke image", "a PNG declaring 0 x 0 pixels", IMAGE, "",
         lambda c: c.ask(png_header(0, 0))),
    Case("graph.invoke image", "a PNG declaring 100000 x 100000 pixels", IMAGE, "pixels",
         lambda c: c.ask(png_header(100_000, 100_000))),
    Case("graph.invoke image", "a decompression bomb (8000 x 8000 in a few KB)", IMAGE,
         "pixels", lambda c: c.ask(bomb())),
    Case("graph.invoke image", "an image over max_bytes", IMAGE, "the limit is",
         lambda c: c.ask(noise(), image_policy=ImagePolicy(max_bytes=1000))),
    Case("graph.invoke image", "an int", IMAGE, "unsupported type int", lambda c: c.ask(42)),
    Case("graph.invoke image", "a dict", IMAGE, "unsupported type dict",
         lambda c: c.ask({"path": "x.png"})),
    Case("graph.invoke image", "an empty list", IMAGE, "empty list", lambda c: c.ask([])),
    Case("graph.invoke image", "more images than max_images", IMAGE, "at most",
         lambda c: c.ask([png()] * 9)),
    Case("graph.invoke image", "an empty string", IMAGE, "empty string", lambda c: c.ask("")),
    Case("graph.invoke image", "invalid base64 in a data URL", IMAGE, "base64",
         lambda c: c.ask("data:image/png;base64,@@@not-base64@@@")),
    Case("graph.invoke image", "an http URL (URLs off by default)", IMAGE,
         "URLs are not allowed", lambda c: c.ask("http://example.com/cat.png")),
    Case("graph.invoke image", "a file:// URL", IMAGE, "not supported",
         lambda c: c.ask("file:///etc/passwd")),
    Case("load_images (URLs allowed)", "a URL to a loopback address (SSRF)", IMAGE,
         "non-public address",
         lambda c: load_images("http://127.0.0.1:9/x.png", ImagePolicy(allow_urls=True))),
    Case("load_images (URLs allowed)", "a URL to a link-local address (cloud metadata)",
         IMAGE, "non-public address",
         lambda c: load_images("http://169.254.169.254/latest/meta-data",
                               ImagePolicy(allow_urls=True))),
    # --- questions ---
    Case("graph.invoke question", "missing (None)", InvalidInputError, "`question` is required",
         lambda c: c.ask(png(), None)),
    Case("graph.invoke question", "empty", InvalidInputError, "question",
         lambda c: c.ask(png(), "")),
    Case("graph.invoke question", "whitespace only", InvalidInputError, "question",
         lambda c: c.ask(png(), " \n\t ")),
    Case("graph.invoke question", "1 MB long", InvalidInputError, "characters",
         lambda c: c.ask(png(), "why? " * 200_000)),
    Case("graph.invoke question", "an int", InvalidInputError, "must be a string, not int",
         lambda c: c.ask(png(), 7)),
    Case("graph.invoke question", "a list of strings", InvalidInputError,
         "must be a string, not list", lambda c: c.ask(png(), ["what", "is it"])),
    # --- configuration ---
    Case("create_insightv_graph", "max_steps=0", ConfigError, "max_steps",
         lambda c: c.graph(max_steps=0)),
    Case("create_insightv_graph", "max_steps=10**9", ConfigError, "max_steps",
         lambda c: c.graph(max_steps=10**9)),
    Case("create_insightv_graph", "max_retries=-1", ConfigError, "max_retries",
         lambda c: c.graph(max_retries=-1)),
    Case("create_insightv_graph", "no reasoner (None)", ConfigError, "needs a chat model",
         lambda c: create_insightv_graph(reasoner=None)),  # type: ignore[arg-type]
    Case("ImagePolicy", "an unknown key", ValueError, "extra",
         lambda c: ImagePolicy(allow_url=True)),  # type: ignore[call-arg]
    Case("ImagePolicy", "max_images=0", ValueError, "max_images",
         lambda c: ImagePolicy(max_images=0)),
    # --- dataset rows (load_items, strict) ---
    *[Case("dataset row", what, InvalidInputError, says,
           lambda c, row=row: _load(c.data(row)))
      for what, row, says in [
          ("no image field", {"question": "q", "answer": "1"}, "`image`"),
          ("no question field", {"image": "good.png", "answer": "1"}, "`question`"),
          ("question is a number", {"image": "good.png", "question": 3, "answer": "1"},
           "`question`"),
          ("answer is a list", {"image": "good.png", "question": "q", "answer": [1, 2]},
           "`answer`"),
          ("empty answer", {"image": "good.png", "question": "q", "answer": ""}, "`answer`"),
          ("choices not a list", {"image": "good.png", "question": "q", "answer": "A",
                                  "choices": "AB"}, "`choices`"),
          ("duplicate id", {"id": "good", "image": "good.png", "question": "q2",
                            "answer": "1"}, "also on line 1"),
          ("image path escaping the folder", {"image": "../secret.png", "question": "q",
                                              "answer": "1"}, "outside the data folder"),
          ("absolute image path", {"image": "/etc/passwd", "question": "q", "answer": "1"},
           "absolute"),
          ("image file missing", {"image": "gone.png", "question": "q", "answer": "1"},
           "no such file"),
          ("image bytes given as a string", {"image": {"bytes": "aGVsbG8="}, "question": "q",
                                             "answer": "1"}, "must be bytes"),
          ("image bytes given as a number", {"image": {"bytes": 10**11}, "question": "q",
                                             "answer": "1"}, "must be bytes"),
          ("image path with a NUL byte", {"image": "a\u0000.png", "question": "q",
                                          "answer": "1"}, "not a usable path"),
          ("a broken JSON line", '{"image": "good.png", "question": ', "not JSON"),
          ("a line that is a JSON list", '["good.png", "q", "1"]', "not a JSON object"),
      ]],
    Case("dataset", "a file that does not exist", InvalidInputError, "no such file",
         lambda c: _load(str(c.tmp / "none.jsonl"))),
    Case("dataset", "an empty file", InvalidInputError, "holds no items",
         lambda c: _load(c.file("d/empty.jsonl", ""))),
    # --- the CLI: every command ---
    Case("insightv run", "an image file that does not exist", CommandRefused, "no such file",
         lambda c: c.cli(*RUN, c.url, "-i", str(c.tmp / "nope.png"), "-q", "q")),
    Case("insightv run", "an empty question", CommandRefused, "question",
         lambda c: c.cli(*RUN, c.url, "-i", c.file("a.png", png()), "-q", " ")),
    Case("insightv run", "--max-steps 0", CommandRefused, "max_steps",
         lambda c: c.cli(*RUN, c.url, "-i", c.file("a.png", png()), "-q", "q",
                         "--max-steps", "0")),
    Case("insightv run", "an unknown --method", CommandRefused, "--method",
         lambda c: c.cli(*RUN, c.url, "-i", c.file("a.png", png()), "-q", "q",
                         "--method", "magic")),
    Case("insightv run", "an unknown --mode", CommandRefused, "mode",
         lambda c: c.cli(*RUN, c.url, "-i", c.file("a.png", png()), "-q", "q",
                         "--mode", "sideways")),
    Case("insightv serve", "a model folder that does not exist", CommandRefused, "model",
         lambda c: c.cli("serve", "--model", str(c.tmp / "no-model"))),
    Case("insightv serve", "a model folder holding only pickle weights", CommandRefused,
         "safetensors only", lambda c: c.cli("serve", "--model", c.pickled())),
    Case("insightv run", "--local-model holding only pickle weights", CommandRefused,
         "safetensors only", lambda c: c.cli("run", "--local-model", c.pickled(), "-i",
                                             c.file("a.png", png()), "-q", "q")),
    Case("insightv run", "--local-model whose code ships with it (trust_remote_code off)",
         CommandRefused, "trust_remote_code", lambda c: c.cli(
             "run", "--local-model", c.remote_code(), "-i", c.file("a.png", png()), "-q", "q")),
    Case("insightv serve", "a malformed --adapter", CommandRefused, "NAME=FOLDER",
         lambda c: c.cli("serve", "--model", str(c.tmp), "--adapter", "just-a-name")),
    Case("insightv synthesize", "--paths 0", CommandRefused, "paths",
         lambda c: c.cli("synthesize", "--input", c.data(), "--out", str(c.tmp / "o"),
                         "--teacher", "t", "--teacher-url", c.url, "-n", "0")),
    Case("insightv synthesize", "--concurrency 0", CommandRefused, "concurrency",
         lambda c: c.cli("synthesize", "--input", c.data(), "--out", str(c.tmp / "o"),
                         "--teacher", "t", "--teacher-url", c.url, "--concurrency", "0")),
    Case("insightv synthesize", "a bad row (refused by default)", CommandRefused, "not JSON",
         lambda c: c.cli("synthesize", "--input", c.data("{oops"), "--out", str(c.tmp / "o"),
                         "--teacher", "t", "--teacher-url", c.url)),
    Case("insightv build-data", "--from a folder that is not a synthesis output",
         CommandRefused, "not a synthesis output folder",
         lambda c: c.cli("build-data", "sft-reason", "--from", str(c.tmp),
                         "--out", str(c.tmp / "ds"))),
    Case("insightv build-data", "an unknown kind", CommandRefused, "sft-reason",
         lambda c: c.cli("build-data", "pretrain", "--from", c.records(),
                         "--out", str(c.tmp / "ds"))),
    Case("insightv build-data", "malformed --bins", CommandRefused, "bins",
         lambda c: c.cli("build-data", "sft-summary", "--from", c.records(),
                         "--out", str(c.tmp / "ds"), "--bins", "1-40,banana")),
    Case("insightv build-data", "--bins out of 1-100", CommandRefused, "within 1-100",
         lambda c: c.cli("build-data", "sft-summary", "--from", c.records(),
                         "--out", str(c.tmp / "ds"), "--bins", "0-400")),
    Case("insightv train sft", "--data that does not exist", CommandRefused, "data",
         lambda c: c.cli("train", "sft", "--model", str(c.tmp), "--data",
                         str(c.tmp / "none"), "--output_dir", str(c.tmp / "o"))),
    Case("insightv train sft", "--learning_rate -1", CommandRefused, "learning_rate",
         lambda c: c.cli("train", "sft", "--model", str(c.tmp), "--data", str(c.tmp),
                         "--output_dir", str(c.tmp / "o"), "--learning_rate", "-1")),
    Case("insightv train sft", "--config with an unknown key", CommandRefused, "learnin_rate",
         lambda c: c.cli("train", "sft", "--model", str(c.tmp), "--data", str(c.tmp),
                         "--output_dir", str(c.tmp / "o"), "--config",
                         c.file("cfg.yaml", "learnin_rate: 0.1\n"))),
    Case("insightv train sft", "--config that is not a mapping", CommandRefused, "mapping",
         lambda c: c.cli("train", "sft", "--model", str(c.tmp), "--data", str(c.tmp),
                         "--output_dir", str(c.tmp / "o"), "--config",
                         c.file("list.yaml", "- 1\n- 2\n"))),
    Case("insightv train dpo", "--beta 0", CommandRefused, "beta",
         lambda c: c.cli("train", "dpo", "--model", str(c.tmp), "--data", str(c.tmp),
                         "--output_dir", str(c.tmp / "o"), "--beta", "0")),
    Case("insightv train iterate", "--rounds 0", CommandRefused, "rounds",
         lambda c: c.cli("train", "iterate", "--model", str(c.tmp), "--input", c.data(),
                         "--output_dir", str(c.tmp / "o"), "--rounds", "0")),
    Case("insightv train iterate", "--questions_per_round 0", CommandRefused,
         "questions_per_round",
         lambda c: c.cli("train", "iterate", "--model", str(c.tmp), "--input", c.data(),
                         "--output_dir", str(c.tmp / "o"), "--questions_per_round", "0")),
    Case("insightv train iterate", "an unknown --final_answer", CommandRefused, "final_answer",
         lambda c: c.cli("train", "iterate", "--model", str(c.tmp), "--input", c.data(),
                         "--output_dir", str(c.tmp / "o"), "--final_answer", "guess")),
    Case("insightv eval", "--data that does not exist", CommandRefused, "no such file",
         lambda c: c.cli("eval", "--data", str(c.tmp / "none.jsonl"), "--out",
                         str(c.tmp / "o"), "--base-url", c.url)),
    Case("insightv eval", "an unknown --method", CommandRefused, "--method",
         lambda c: c.cli("eval", "--data", c.data(), "--out", str(c.tmp / "o"),
                         "--base-url", c.url, "--method", "magic")),
    Case("insightv eval", "--concurrency 0", CommandRefused, "concurrency",
         lambda c: c.cli("eval", "--data", c.data(), "--out", str(c.tmp / "o"),
                         "--base-url", c.url, "--concurrency", "0")),
]


def _load(path: str) -> Any:
    from insightv_agents.synthesize import load_items

    return load_items(path)


@dataclass(frozen=True)
class Accepted:
    """An unusual image the library takes on purpose, and what the model then receives."""

    what: str
    data: Callable[[], bytes]


def _animated() -> bytes:
    buffer = io.BytesIO()
    frames = [Image.new("P", (8, 8), colour) for colour in (1, 2, 3)]
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    return buffer.getvalue()


ACCEPTED: list[Accepted] = [
    Accepted("a CMYK JPEG (converted to RGB)", lambda: png((16, 16), "CMYK", "JPEG")),
    Accepted("a 16-bit greyscale PNG (converted to RGB)", lambda: png((16, 16), "I;16")),
    Accepted("a palette PNG (converted to RGB)", lambda: png((16, 16), "P")),
    Accepted("an RGBA PNG (flattened on white)", lambda: png((16, 16), "RGBA")),
    Accepted("an animated GIF (its first frame)", _animated),
    Accepted("a 1 x 1 image", lambda: png((1, 1))),
]
