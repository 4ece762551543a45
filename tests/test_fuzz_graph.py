"""Whole graph runs (Insight-V, stage-level beam search, synthesis) on adversarial model
text: they always end within their caps, with a typed outcome."""

from __future__ import annotations

import json
from typing import Any

from helpers import png_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from insightv_agents import create_insightv_graph, create_stage_beam_graph, create_synthesis_graph
from insightv_agents.testing import ScriptedChatModel

MAX_STEPS, MAX_RETRIES, MAX_REVISIONS = 4, 1, 1
CALLS_PER_PASS = (MAX_STEPS + 1) * (MAX_RETRIES + 1)
MAX_CALLS = (MAX_REVISIONS + 1) * CALLS_PER_PASS

step_like = st.fixed_dictionaries({
    "summary": st.text(max_size=30), "reasoning": st.text(max_size=60),
    "action": st.sampled_from(["continue", "summary", "final_answer", "Continue", "??", ""]),
}).map(json.dumps)
verdict_like = st.fixed_dictionaries({
    "reasoning_correct": st.one_of(st.booleans(), st.text(max_size=5), st.integers()),
    "critique": st.text(max_size=30), "answer": st.one_of(st.text(max_size=10), st.integers()),
}).map(json.dumps)
adversarial = st.one_of(
    st.text(max_size=300),
    st.text(alphabet=st.characters(max_codepoint=0x1F), max_size=200),
    step_like, verdict_like,
    st.just(json.dumps({"summary": "again", "reasoning": "x", "action": "continue"})),
    st.just("{" * 5_000), st.just("[" * 5_000),
    st.integers(min_value=0, max_value=200_000).map(lambda n: "x" * n),
    st.lists(step_like, max_size=20).map("\n".join),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies=st.lists(adversarial, min_size=1, max_size=12),
       mode=st.sampled_from(["step", "chain"]))
def test_any_model_text_ends_within_caps(replies: list[str], mode: Any) -> None:
    model = ScriptedChatModel(replies, cycle=True)
    graph = create_insightv_graph(reasoner=model, mode=mode, max_steps=MAX_STEPS,
                                  max_retries=MAX_RETRIES, max_revisions=MAX_REVISIONS).compile()
    out = graph.invoke({"image": png_bytes((4, 4)), "question": "q?"})
    assert out["status"] in ("ok", "failed")
    assert (out["status"] == "ok") == (out["verdict"] is not None)
    assert len(out["steps"]) <= MAX_STEPS and len(out["attempts"]) <= MAX_REVISIONS
    assert len(model.calls) <= MAX_CALLS
    assert all(f["kind"] in ("unparsable", "step_cap") for f in out["failures"])


def test_endless_continue_is_stopped_by_the_step_cap() -> None:
    endless = json.dumps({"summary": "more", "reasoning": "x", "action": "continue"})
    model = ScriptedChatModel([endless], cycle=True)
    graph = create_insightv_graph(reasoner=model, max_steps=16).compile()
    out = graph.invoke({"image": png_bytes((4, 4)), "question": "q?"})
    assert len(out["steps"]) == 16 and out["failures"][0]["kind"] == "step_cap"
    assert out["status"] == "failed"  # the endless model cannot give a verdict either
    assert len(model.calls) == 16 + 3


stage_like = st.tuples(*(st.sampled_from([f"<{tag}>", f"</{tag}>", f"<{tag.lower()}>", ""])
                         for tag in ("SUMMARY", "CAPTION", "REASONING", "CONCLUSION")),
                       st.text(max_size=40)).map(lambda parts: f" {parts[-1]} ".join(parts[:-1]))
stage_adversarial = st.one_of(
    adversarial, stage_like,
    st.sampled_from(["Since it is better, I choose response 3.", "I choose response 1.",
                     "Response 2 is better", "Correct", "Incorrect", "<CONCLUSION>" * 1000]),
    # Runs of whitespace after the words and tags the readers look for (these once took
    # seconds to minutes to read), and long replies with no full stop.
    st.tuples(st.sampled_from(["I choose", "<SUMMARY", "Response 1 is", "The answer is",
                               "<CONCLUSION>", "Answer:"]),
              st.sampled_from([" ", "\t", "\n", " \n"]),
              st.integers(min_value=1, max_value=50_000)).map(
                  lambda parts: parts[0] + parts[1] * parts[2]),
    st.integers(min_value=1, max_value=20_000).map(lambda n: " word" * n))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies=st.lists(stage_adversarial, min_size=1, max_size=12),
       search=st.sampled_from(["stage", "best_of_n", "sentence", "single"]))
def test_stage_beam_search_on_any_model_text_ends_with_a_typed_outcome(
        replies: list[str], search: Any) -> None:
    model = ScriptedChatModel(replies, cycle=True)
    graph = create_stage_beam_graph(model, search=search, beam_size=2, max_sentences=6,
                                    max_retries=1).compile()
    out = graph.invoke({"image": png_bytes((4, 4)), "question": "q?"})
    assert out["status"] in ("ok", "failed")
    assert set(out["stages"]) == {"summary", "caption", "reasoning", "conclusion"}
    assert isinstance(out["answer"], str) and len(model.calls) <= 120
    assert len(json.dumps(out)) < 2_000_000  # every model-derived text is capped


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies=st.lists(adversarial, min_size=1, max_size=12))
def test_synthesis_on_any_model_text_keeps_every_path_with_a_typed_outcome(
        replies: list[str]) -> None:
    model = ScriptedChatModel(replies, cycle=True)
    graph = create_synthesis_graph(teacher=model, paths=3, max_steps=MAX_STEPS,
                                   max_retries=MAX_RETRIES).compile()
    out = graph.invoke({"image": png_bytes((4, 4)), "question": "q?", "answer": "3"})
    assert [path["index"] for path in out["paths"]] == [0, 1, 2]
    for path in out["paths"]:
        assert path["status"] in ("ok", "failed") and len(path["steps"]) <= MAX_STEPS
        assert path["score"] is None or 1 <= path["score"] <= 100
        assert path["status"] == "ok" or path["failures"]  # a failed path says why
    assert all(f["kind"] in ("unparsable", "rejected") for f in out["scoring_failures"])
    assert len(model.calls) <= 3 * CALLS_PER_PASS + (MAX_RETRIES + 1) * 4
