"""Recipes: every shipped one validates; every kind of mistake is reported, all at once, with the file,
line and key path, a did-you-mean where one helps, and exit code 2 without a traceback."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qat.cli import UserError
from qat.recipe import (CONFIGS_DIR, PRESET_DIRS, Recipe, RecipeError, did_you_mean, dump_config, load_recipe,
                        load_resolved)

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems(path: Path, overrides=()) -> list[str]:
    with pytest.raises(RecipeError) as e:
        load_recipe(path, overrides)
    return [str(p) for p in e.value.problems]


# -- shipped recipes and presets ----------------------------------------------------------------------

@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipe_validates_and_starts_with_its_command(path):
    first = path.read_text().splitlines()[0]
    assert first == f"# python scripts/train.py recipes/{path.name}" or first.startswith(
        f"# python scripts/train.py recipes/{path.name} "), first
    recipe = load_recipe(path)
    assert recipe.name == path.stem


@pytest.mark.parametrize("section,preset", [(s, p.stem) for s, d in PRESET_DIRS.items()
                                            for p in sorted((CONFIGS_DIR / d).glob("*.yaml"))])
def test_every_preset_loads(tmp_path, section, preset):
    other = {"quant": "quant: q4_0\n"}  # a section needs its required keys
    body = f"{section}: {preset}\n" + "".join(v for k, v in other.items() if k != section)
    recipe = load_recipe(write(tmp_path, body))
    assert getattr(recipe, section) is not None


def test_resolved_config_round_trips(tmp_path):
    recipe = load_recipe(REPO / "recipes" / "quickstart.yaml", ["train.max_steps=7"])
    saved = write(tmp_path, dump_config(recipe), "config.yaml")
    assert load_resolved(saved) == recipe
    assert "preset" not in saved.read_text()


# -- unknown keys, types, values: all at once, with where and what ---------------------------------------

BAD = """\
name: bad
model: smollm2
data:
  preset: shakespeare
  seq_lenn: 128
train:
  max_steps: abc
  lr: 1.0e-4
  precision: bf16mixed
quant:
  scheme: q4_o
  observr: mse
"""


def test_all_problems_reported_at_once_with_file_line_and_key(tmp_path):
    found = problems(write(tmp_path, BAD))
    path = str(tmp_path / "r.yaml")
    expected = [
        (f"{path}:5: data.seq_lenn: unknown key (did you mean 'seq_len'?)"),
        (f"{path}:7: train.max_steps: Input should be a valid integer"),
        (f"{path}:9: train.precision: 'bf16mixed' is not one of"),
        (f"{path}:11: quant.scheme: unknown scheme 'q4_o' (did you mean 'q4_0'?)"),
        (f"{path}:12: quant.observr: unknown key (did you mean 'observer'?)"),
    ]
    assert len(found) == len(expected), found
    for want, got in zip(expected, found):
        assert got.startswith(want), (want, got)
    assert "(did you mean 'bf16-mixed'?)" in found[2]


def test_unknown_top_level_section_and_preset_suggest(tmp_path):
    found = problems(write(tmp_path, "model: smolm2\ntrainer: {max_steps: 2}\n"))
    assert any("model.preset: no model preset 'smolm2' (did you mean 'smollm2'?)" in p for p in found), found
    assert any(":2: trainer: unknown key (did you mean 'train'?)" in p for p in found), found


def test_problem_in_a_preset_names_the_preset_file(tmp_path):
    write(tmp_path, "kind: tiny\ntiny: {hiden_size: 32}\n", "mymodel.yaml")
    found = problems(write(tmp_path, f"model: {tmp_path / 'mymodel.yaml'}\n"))
    assert len(found) == 1 and "mymodel.yaml:2: model.tiny.hiden_size: unknown key (did you mean 'hidden_size'?)" in found[0]


def test_rules_schemes_and_cross_section_checks(tmp_path):
    found = problems(write(tmp_path, "quant:\n  scheme: q4_0\n  start_step: 10\n  rules: {lm_head: q9_0}\n"
                                     "train: {max_steps: 10}\n"))
    assert any("quant.rules.lm_head: unknown scheme 'q9_0'" in p for p in found), found
    found = problems(write(tmp_path, "quant: {scheme: q4_0, start_step: 10}\ntrain: {max_steps: 10}\n"))
    assert found == [f"{tmp_path / 'r.yaml'}:1: quant.start_step: 10 is not below train.max_steps=10: "
                     "fake quant would never switch on"]


def test_export_types_must_be_what_was_trained(tmp_path):
    found = problems(write(tmp_path, "quant: q4_0\nexport: {gguf: [q8_0, f16]}\n"))
    assert len(found) == 1 and "export.gguf.0: q8_0 would re-quantize a model trained as q4_0" in found[0]
    load_recipe(write(tmp_path, "quant: q4_0\nexport: {gguf: [q4_0, f16]}\n"))


def test_missing_files_are_recipe_errors(tmp_path):
    found = problems(write(tmp_path, "model: {kind: gguf, path: nowhere/model.gguf}\n"
                                     "data: {source: files, paths: [nowhere/*.txt]}\n"))
    assert any("model: GGUF file 'nowhere/model.gguf' not found" in p for p in found), found
    assert any("data.paths: no file matches 'nowhere/*.txt'" in p for p in found), found


def test_yaml_syntax_error_and_duplicate_keys(tmp_path):
    found = problems(write(tmp_path, "train:\n  max_steps: 3\n  max_steps: 4\n"))
    assert found == [f"{tmp_path / 'r.yaml'}:3: train.max_steps: duplicate key"]
    found = problems(write(tmp_path, "train: {max_steps: 3\nquant: q4_0\n"))
    assert len(found) == 1 and "not valid YAML" in found[0]


def test_missing_recipe_file_suggests_a_sibling(tmp_path):
    write(tmp_path, "{}\n", "quickstart.yaml")
    with pytest.raises(UserError, match="did you mean"):
        load_recipe(tmp_path / "quickstrat.yaml")


# -- overrides ---------------------------------------------------------------------------------------

def test_overrides_are_parsed_as_yaml_and_type_checked(tmp_path):
    path = write(tmp_path, "quant: q4_0\n")
    r = load_recipe(path, ["train.max_steps=200", "train.lr=3e-4", "train.grad_clip=null", "quant.start_step=5",
                           "quant.rules.model.layers.0.mlp.down_proj=q8_0", "data.val_documents=[hamlet, lear]",
                           "model=tiny", "model.tiny.num_hidden_layers=1"])
    assert r.train.max_steps == 200 and r.train.lr == 3e-4 and r.train.grad_clip is None
    assert r.quant.rules == {"model.layers.0.mlp.down_proj": "q8_0"}  # a rule pattern keeps its dots
    assert r.data.val_documents == ["hamlet", "lear"]
    assert r.model.kind == "tiny" and r.model.tiny.num_hidden_layers == 1
    assert load_recipe(path, ["quant=null"]).quant is None


def test_bad_overrides_name_the_override(tmp_path):
    found = problems(write(tmp_path, "quant: q4_0\n"),
                     ["train.max_step=5", "train.batch_size=many", "quant.observer=mse2", "train.lr.x=1", "oops"])
    assert found == [
        "override 'train.max_step=5': train.max_step: unknown key (did you mean 'max_steps'?); train takes: "
        + ", ".join(Recipe.model_fields["train"].annotation.model_fields),
        "override 'train.batch_size=many': train.batch_size: Input should be a valid integer, unable to parse "
        "string as an integer, got 'many'",
        "override 'quant.observer=mse2': quant.observer: 'mse2' is not one of dynamic, mse, learned "
        "(did you mean 'mse'?)",
        "override 'train.lr.x=1': train.lr.x: train.lr is a value, not a section",
        "override 'oops': expected key.sub=value (e.g. train.max_steps=200)",
    ]


def test_an_override_replaces_what_the_yaml_said(tmp_path):
    found = problems(write(tmp_path, "quant: q4_0\nexport:\n  gguf:\n    - q4_0\n"), ["export.gguf=[q8_0]"])
    assert found == ["override 'export.gguf=[q8_0]': export.gguf.0: q8_0 would re-quantize a model trained as "
                     "q4_0; export it as q4_0 (or f16/bf16/f32)"]


def test_did_you_mean_prefers_look_alikes():
    assert did_you_mean("q4_o", ["q4_k", "q4_1", "q4_0"]) == " (did you mean 'q4_0'?)"
    assert did_you_mean("zzz", ["q4_0"]) == ""


# -- the script: exit 2, one message, no traceback ------------------------------------------------------

def run_train(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_script_exits_2_without_traceback_on_a_bad_recipe(tmp_path):
    out = run_train(str(write(tmp_path, BAD)), "train.batch_size=x")
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith(f"error: {tmp_path / 'r.yaml'}: 6 problems\n")
    assert "override 'train.batch_size=x': train.batch_size:" in out.stderr
    out = run_train(str(tmp_path / "missing.yaml"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "not found" in out.stderr


def test_print_config_prints_the_resolved_recipe():
    out = run_train("recipes/quickstart.yaml", "train.max_steps=3", "--print-config")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["max_steps"] == 3
    assert resolved["model"]["kind"] == "embedded" and resolved["quant"]["scheme"] == "q4_0"
    assert resolved["data"]["val_documents"] == ["hamlet", "macbeth", "othello", "tempest"]
