"""Every default here is sd-scripts' (recorded in tests/data/sd_scripts_*_defaults.toml) or its difference is explained."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import write_defaults_table  # noqa: E402


def test_every_difference_is_explained_and_every_explanation_is_needed():
    rows = write_defaults_table.all_rows()
    assert len([r for r in rows if r.script == "training"]) == 168
    unexplained = [(r.name, r.here, r.reference) for r in rows if r.differs and not r.why]
    assert unexplained == []
    stale = [r.name for r in rows if r.why and not r.differs]
    assert stale == []


def test_the_defaults_the_issue_named_are_sd_scripts_ones():
    rows = {(r.script, r.name): r for r in write_defaults_table.all_rows()}
    for name, value in [("learning_rate", 2e-6), ("max_data_loader_n_workers", 8), ("sample_sampler", "ddim"),
                        ("output_name", None), ("caption_extension", ".caption"), ("max_bucket_reso", 1024)]:
        row = rows[("training", name)]
        assert row.here == value and not row.differs, name


def test_docs_defaults_table_is_current():
    text = write_defaults_table.table(write_defaults_table.all_rows())
    assert write_defaults_table.DOC.read_text(encoding="utf-8") == text, "run python tools/write_defaults_table.py"
