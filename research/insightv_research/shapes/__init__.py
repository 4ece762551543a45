"""The shapes world: a procedural visual-reasoning benchmark whose every part can be made,
trained and measured offline.

- :mod:`~insightv_research.shapes.scenes`: scenes of coloured shapes on a grid, drawn with
  Pillow, each with its description (:class:`Scene`) and an index from image to scene.
- :mod:`~insightv_research.shapes.questions`: multi-step questions (counting under conditions,
  comparing counts, arithmetic over counts, spatial relations) and single look-ups
  (perception), with answers computed from the scene.
- :mod:`~insightv_research.shapes.reasoning`: reasoning paths in the library's step format,
  several strategies per question, and flawed paths with controlled kinds and amounts of error.
- :mod:`~insightv_research.shapes.teacher` / :mod:`~insightv_research.shapes.scorer`: a teacher
  chat model and a path scorer grounded in the scene, for the synthesis pipeline.
- :mod:`~insightv_research.shapes.dataset`: seeded train/val/test splits in the synthesis input
  format.
"""

from insightv_research.shapes.dataset import make_dataset
from insightv_research.shapes.questions import (
    ANSWER_RULES,
    CATEGORIES,
    Query,
    parse_question,
    sample_query,
)
from insightv_research.shapes.reasoning import FLAW_KINDS, STRATEGIES, Flaw, plan_path
from insightv_research.shapes.scenes import Scene, SceneIndex, Shape, draw_scene, random_scene
from insightv_research.shapes.scorer import SceneScorer, check_claims
from insightv_research.shapes.teacher import SceneTeacher

__all__ = [
    "ANSWER_RULES",
    "CATEGORIES",
    "FLAW_KINDS",
    "STRATEGIES",
    "Flaw",
    "Query",
    "Scene",
    "SceneIndex",
    "SceneScorer",
    "SceneTeacher",
    "Shape",
    "check_claims",
    "draw_scene",
    "make_dataset",
    "parse_question",
    "plan_path",
    "random_scene",
    "sample_query",
]
