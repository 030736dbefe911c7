"""Issue 17: the operator's inputs (a sources file, `dimec monitor`, `dimec route`, `dimec plan`) checked like
everything else: every problem at once, exit 2, never a traceback, never a wrong answer with exit 0."""

from __future__ import annotations

import json

import pytest

from dimec.cli import main


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """`dimec ARGV` in this process: exit code, stdout, stderr; a traceback fails the test."""
    try:
        code = main(argv)
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    return code, out.out, out.err


# ---- 7. the sources file: one checked schema ------------------------------------------------------------------------
GOOD_SOURCES = {"classes": [{"name": "high"}, {"name": "low"}],
                "sources": [{"name": "a", "token": "token-aaaa-1", "priority": "high"},
                            {"name": "b", "token": "token-bbbb-1", "priority": "low"}]}


@pytest.mark.parametrize("change, expected", [
    ({"scheduling": {"retry_after_s": float("inf")}}, ["retry_after_s"]),
    ({"allocation": {"valid_s": float("inf")}}, ["valid_s"]),
    ({"scheduling": {"queue_capacity": 10**12}}, ["queue_capacity"]),
    ({"sources": ["not a mapping", {"name": 5, "priority": "low", "token": "token-cccc-1"},
                  {"name": None, "priority": "low", "token": "token-dddd-1"}]},
     ["sources[0] must be a mapping", "sources[1].name", "sources[2]: 'name' is required"]),
    ({"classes": [{"name": "high", "weight": float("nan")}, 7], "scheduling": {"retry_after_s": "soon"},
      "allocation": {"enabled": "yes", "horizon_s": -1}},
     ["classes[0].weight", "classes[1] must be a mapping", "retry_after_s", "enabled", "horizon_s"]),
    ({"scheduling": [1, 2]}, ["scheduling must be a mapping"]),
])
def test_sources_file_problems_are_all_reported_with_exit_2(capsys, tmp_path, change, expected):
    import yaml

    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({**GOOD_SOURCES, **change}))
    code, _, err = run_cli(capsys, ["serve", "edge", str(tmp_path / "no-package"), "--sources", str(path)])
    assert code == 2, err
    for text in expected:
        assert text in err, (text, err)


def test_a_good_sources_file_still_loads(tmp_path):
    from dimec.serving.sources import SourceTable

    path = tmp_path / "fleet.json"
    path.write_text(json.dumps({**GOOD_SOURCES, "scheduling": {"retry_after_s": 2, "queue_capacity": 64}}))
    table = SourceTable.load(path)
    assert table.scheduled and [s.name for s in table.sources] == ["a", "b"]
