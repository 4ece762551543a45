"""The whole bad-input catalogue, in sections: what ``tests/test_bad_inputs.py`` runs and
``scripts/reliability.py`` tabulates in ``docs/reliability.md``."""

from __future__ import annotations

import bad_inputs
import bad_inputs_files
import bad_inputs_images
import bad_inputs_options
from bad_inputs import Case

SECTIONS: dict[str, list[Case]] = {
    "Images, questions, dataset rows, model folders and command options": bad_inputs.CASES,
    "Damaged files and unreadable dataset rows": bad_inputs_files.CASES,
    "Sampling, client and server options; adapters": bad_inputs_options.CASES,
    "Image URLs and image policies": bad_inputs_images.CASES,
}
CASES: list[Case] = [case for cases in SECTIONS.values() for case in cases]
