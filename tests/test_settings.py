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


def test_precedence_cli_over_env_over_recipe_over_dotenv_over_default(tmp_path):
    (tmp_path / ".env").write_text("REAP_PRUNE_RATIO=0.3\nREAP_BATCH_SIZE=7\nREAP_SEED=5\nREAP_MAX_SAMPLES=9\n")
    (tmp_path / "r.yaml").write_text("REAP_PRUNE_RATIO: 0.35\nREAP_SEED: 11\nREAP_BATCH_SIZE: 3\nREAP_SHUFFLE: false\n")
    env = {"REAP_PRUNE_RATIO": "0.4", "REAP_SEED": "6"}
    s = S.load(S.ReapSettings, ["--prune-ratio", "0.25", "--config", "r.yaml"], env)
    assert s.prune_ratio == 0.25  # the flag wins
    assert s.seed == 6  # the environment beats the recipe
    assert s.batch_size == 3 and s.shuffle is False  # the recipe beats .env
    assert s.max_samples == 9  # .env beats the default
    assert s.max_seq_len == 512 and s.config == Path("r.yaml")
    # the recipe can also be named in the environment or in .env
    assert S.load(S.ReapSettings, [], {"REAP_CONFIG": "r.yaml"}).batch_size == 3
    (tmp_path / ".env").write_text("REAP_CONFIG=r.yaml\nREAP_BATCH_SIZE=7\n")
    assert S.load(S.ReapSettings, [], {}).batch_size == 3


def test_empty_value_means_the_stage_default(tmp_path):
    # .env.example leaves keys whose defaults differ per stage empty: each stage keeps its own
    (tmp_path / ".env").write_text("REAP_EVAL_SAMPLES=\nREAP_PRUNE_RATIO=\nREAP_MODALITY=\nREAP_ROUND_TO=\n")
    reap, prune, test = (S.load(cls, [], {}) for cls in (S.ReapSettings, S.PruneSettings, S.TestSettings))
    assert (reap.eval_samples, reap.prune_ratio, reap.modality, reap.round_to) == (
        S.ReapSettings().eval_samples,
        0.5,
        "balanced",
        1,
    )
    assert (prune.prune_ratio, prune.modality, prune.round_to) == (None, "", 0)
    assert test.eval_samples == S.TestSettings().eval_samples != reap.eval_samples


def test_recipe_values_keep_their_type_rules(tmp_path):
    (tmp_path / "r.yaml").write_text("REAP_BATCH_SIZE: 2.5\n")
    with pytest.raises(SettingsError, match=r"REAP_BATCH_SIZE='2.5' \(recipe r\.yaml\) is not an integer"):
        S.load(S.ReapSettings, ["--config", "r.yaml"], {})
    (tmp_path / "r.yaml").write_text("REAP_MODEL_PATH: null\nREAP_EVAL_RATIOS: none\n# a comment\n")
    s = S.load(S.ReapSettings, ["--config", "r.yaml"], {})
    assert s.model_path is None and s.candidate_ratios == []


def test_help_shows_the_effective_default_its_source_choices_and_key(tmp_path):
    (tmp_path / ".env").write_text("REAP_SEED=5\nREAP_DTYPE=float32\n")
    (tmp_path / "r.yaml").write_text("REAP_MAX_SAMPLES: 12\nREAP_DTYPE: bfloat16\n")
    env = {"REAP_BATCH_SIZE": "2", "REAP_CONFIG": "r.yaml"}
    text = " ".join(S.build_parser(S.ReapSettings, "reap.py", S.sources([], env)).format_help().split())
    assert "[REAP_BATCH_SIZE; default: 2, from the environment]" in text
    assert "[REAP_MAX_SAMPLES; default: 12, from recipe r.yaml]" in text
    assert "[REAP_DTYPE; default: bfloat16, from recipe r.yaml]" in text  # the recipe beats .env
    assert "[REAP_SEED; default: 5, from .env]" in text
    assert "[REAP_MAX_SEQ_LEN; default: 512]" in text and "[REAP_MODEL_PATH; default: not set]" in text
    assert "--scoring-mode {full,routed,router}" in text and "Choices: full, routed, router." in text
    assert "(default: None)" not in text
    prune = " ".join(S.build_parser(S.PruneSettings, "prune_model.py", S.sources([], {})).format_help().split())
    assert "[REAP_PRUNE_RATIO; default: not set]" in prune and "[REAP_ROUND_TO; default: 0]" in prune


def test_readme_table_states_each_stages_default():
    rows = {key: defaults for key, defaults, _ in S.schema_rows()}
    reap, test = S.ReapSettings().eval_samples, S.TestSettings().eval_samples
    assert rows["REAP_EVAL_SAMPLES"] == {"reap": str(reap), "test": str(test)}
    assert rows["REAP_PRUNE_RATIO"] == {"reap": "0.5", "prune": ""}
    table = S.readme_table()
    assert f"| `REAP_EVAL_SAMPLES` | reap: `{reap}`<br>test: `{test}` |" in table
    assert "| `REAP_ROUND_TO` | reap: `1`<br>prune: `0` |" in table
    assert "\nREAP_EVAL_SAMPLES=\n" in S.env_example()  # empty: every stage keeps its own default


def test_quiet_and_verbose_flags_set_the_log_level():
    assert S.load(S.ReapSettings, ["--quiet"], {}).log_level == "quiet"
    assert S.load(S.ReapSettings, ["-v"], {"REAP_LOG_LEVEL": "quiet"}).log_level == "verbose"
    assert S.load(S.TestSettings, [], {"REAP_LOG_LEVEL": "verbose"}).log_level == "verbose"
    with pytest.raises(SettingsError, match="REAP_LOG_LEVEL='loud' is not a valid choice"):
        S.load(S.PruneSettings, [], {"REAP_LOG_LEVEL": "loud"})


def test_resolved_recipes_round_trip(tmp_path):
    reap = S.load(S.ReapSettings, ["--prune-ratio", "0.25", "--eval-ratios", "", "--no-shuffle", "--seed", "3"], {})
    (tmp_path / "reap.yaml").write_text(S.recipe_text(S.recipe_values(reap), "reap"))
    again = S.load(S.ReapSettings, ["--config", "reap.yaml"], {})
    assert again.to_dict() == {**reap.to_dict(), "config": "reap.yaml", "eval_ratios": "none"}
    assert again.candidate_ratios == reap.candidate_ratios == []  # '' on the command line is 'none' in a recipe
    # the pruned folder's recipe: the reap stage's settings, then the prune stage's (a re-cut ratio wins)
    prune = S.load(S.PruneSettings, ["--prune-ratio", "0.4", "--method", "merge"], {})
    combined = S.combined_recipe(reap.to_dict(), prune)
    assert combined["REAP_PRUNE_RATIO"] == 0.4 and combined["REAP_METHOD"] == "merge"
    assert combined["REAP_MODALITY"] == "balanced" and combined["REAP_SEED"] == 3  # prune left these at default
    (tmp_path / "pruned.yaml").write_text(S.recipe_text(combined, "both"))
    assert S.load(S.ReapSettings, ["--config", "pruned.yaml"], {}).shuffle is False
    assert S.load(S.PruneSettings, ["--config", "pruned.yaml"], {}).method == "merge"
    assert "REAP_CONFIG" not in combined and "REAP_LOG_LEVEL" not in combined
