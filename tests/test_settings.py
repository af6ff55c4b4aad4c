"""Settings: precedence, unknown keys, invalid values, and the generated docs staying in sync."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from reap_vlm import settings as S
from reap_vlm.errors import SettingsError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no stray .env from the repo


def test_defaults():
    s = S.load(S.ReapSettings, [], {})
    assert s.scoring_mode == "full" and s.prune_ratio == 0.5 and s.calibration == "combined"
    assert s.metadata_file == Path("outputs") / "reap_metadata.json"


def test_precedence_cli_over_env_over_dotenv_over_default(tmp_path):
    (tmp_path / ".env").write_text("REAP_PRUNE_RATIO=0.3\nREAP_BATCH_SIZE=7\nREAP_SEED=5\n")
    env = {"REAP_PRUNE_RATIO": "0.4", "REAP_SEED": "6"}
    s = S.load(S.ReapSettings, ["--prune-ratio", "0.25"], env)
    assert s.prune_ratio == 0.25  # CLI wins
    assert s.seed == 6  # environment beats .env
    assert s.batch_size == 7  # .env beats the default
    assert s.max_seq_len == 512  # default


def test_env_file_named_by_reap_env_file(tmp_path):
    other = tmp_path / "custom.env"
    other.write_text("REAP_SCORING_MODE=routed\n")
    (tmp_path / ".env").write_text("REAP_SCORING_MODE=router\n")
    assert S.load(S.ReapSettings, [], {"REAP_ENV_FILE": str(other)}).scoring_mode == "routed"
    assert S.load(S.ReapSettings, [], {}).scoring_mode == "router"


def test_missing_named_env_file():
    with pytest.raises(SettingsError, match=r"REAP_ENV_FILE=nope\.env does not exist"):
        S.load(S.ReapSettings, [], {"REAP_ENV_FILE": "nope.env"})


def test_unknown_key_in_dotenv_names_closest(tmp_path):
    (tmp_path / ".env").write_text("REAP_PRUNE_RATO=0.3\n")
    expected = r"unknown setting REAP_PRUNE_RATO in \.env: did you mean REAP_PRUNE_RATIO\?"
    with pytest.raises(SettingsError, match=expected):
        S.load(S.ReapSettings, [], {})


def test_unknown_key_in_environment():
    with pytest.raises(SettingsError, match="did you mean REAP_SCORING_MODE"):
        S.load(S.PruneSettings, [], {"REAP_SCORING_MOD": "full"})


def test_keys_of_other_stages_are_known():
    # one .env serves every stage: a test-stage key must not break the reap stage
    s = S.load(S.ReapSettings, [], {"REAP_MAX_NEW_TOKENS": "8", "REAP_RUNTIME": "local"})
    assert s.scoring_mode == "full"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REAP_PRUNE_RATIO": "0"}, "REAP_PRUNE_RATIO=0.0 is out of range"),
        ({"REAP_PRUNE_RATIO": "1"}, "out of range"),
        ({"REAP_PRUNE_RATIO": "-0.2"}, "out of range"),
        ({"REAP_PRUNE_RATIO": "nan"}, "out of range"),
        ({"REAP_PRUNE_RATIO": "half"}, "REAP_PRUNE_RATIO='half' is not a number"),
        ({"REAP_SCORING_MODE": "fast"}, "REAP_SCORING_MODE='fast' is not a valid choice"),
        ({"REAP_CRITERION": "magic"}, "REAP_CRITERION='magic' is not a valid choice"),
        ({"REAP_BATCH_SIZE": "0"}, "REAP_BATCH_SIZE must be > 0"),
        ({"REAP_BATCH_SIZE": "2.5"}, "is not an integer"),
        ({"REAP_SHUFFLE": "maybe"}, "is not true/false"),
        ({"REAP_DEVICE": "tpu"}, "REAP_DEVICE='tpu' is not a device"),
        ({"REAP_EVAL_RATIOS": "0.5,x"}, "REAP_EVAL_RATIOS"),
        ({"REAP_IMAGE_SHARE": "1.5"}, "REAP_IMAGE_SHARE must be within"),
    ],
)
def test_invalid_values_are_one_line_errors(env, message):
    with pytest.raises(SettingsError, match=re.escape(message)) as info:
        S.load(S.ReapSettings, [], env)
    assert "\n" not in str(info.value)


def test_cli_bool_flags():
    assert S.load(S.ReapSettings, ["--no-shuffle"], {}).shuffle is False
    assert S.load(S.ReapSettings, ["--resume"], {"REAP_RESUME": "false"}).resume is True


def test_prune_ratio_optional_for_prune_stage():
    assert S.load(S.PruneSettings, [], {}).prune_ratio is None
    assert S.load(S.PruneSettings, [], {"REAP_PRUNE_RATIO": ""}).prune_ratio is None


def test_env_example_matches_schema():
    assert (ROOT / ".env.example").read_text() == S.env_example(), "regenerate: python -m reap_vlm.settings sync-docs"


def test_env_example_parses_and_covers_every_key():
    from dotenv import dotenv_values

    values = dotenv_values(ROOT / ".env.example")
    assert set(values) == set(S.known_keys())


def test_readme_table_matches_schema():
    readme = (ROOT / "README.md").read_text()
    assert S.readme_table() in readme, "regenerate: python -m reap_vlm.settings sync-docs"


def test_dump_writes_settings_and_versions(tmp_path):
    s = S.load(S.ReapSettings, [], {})
    S.dump(s, tmp_path / "settings.json")
    import json

    data = json.loads((tmp_path / "settings.json").read_text())
    assert data["stage"] == "reap" and data["settings"]["prune_ratio"] == 0.5
    assert data["versions"]["transformers"]
