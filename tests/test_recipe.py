import pytest

from metamerge.errors import RecipeError
from metamerge.recipe import load_recipe, parse_recipe

BASE = {"name": "m", "base": "/b", "finetunes": [{"ref": "/f1", "name": "a"}, {"ref": "/f2", "name": "b"}]}


def test_defaults_and_method_parameters():
    r = parse_recipe({**BASE, "method": "ties"})
    assert r.method.param("density") == 0.2 and r.method.param("scale") == 1.0
    r = parse_recipe({**BASE, "method": {"name": "task_arithmetic"}})
    assert r.method.param("scale") == 0.3
    r = parse_recipe({**BASE, "method": {"name": "task_arithmetic", "lambda": 0.5}})
    assert r.method.param("scale") == 0.5
    assert parse_recipe(BASE).method.param("granularity") == "model"


@pytest.mark.parametrize(
    ("patch", "fragment"),
    [
        ({"methd": "metagpt"}, "methd: unknown key"),
        ({"method": {"name": "metagpt", "density": 0.3}}, "'density' does not apply to method 'metagpt'"),
        ({"method": {"name": "ties", "density": 1.5}}, "method.density"),
        ({"method": {"name": "dare"}}, "set 'seed'"),
        ({"method": "magic"}, "method.name"),
        ({"merge": {"dtype": "int8"}}, "merge.dtype"),
        ({"finetunes": []}, "finetunes"),
        ({"finetunes": [{"ref": "/x", "name": "a"}, {"ref": "/y", "name": "a"}]}, "repeated: a"),
        ({"evaluation": {"tasks_dir": "/t"}}, "missing on: a, b"),
        ({"name": "has space"}, "name"),
    ],
)
def test_bad_values_name_the_key(patch, fragment):
    with pytest.raises(RecipeError) as info:
        parse_recipe({**BASE, **patch})
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_yaml_errors_are_one_clear_line(tmp_path):
    bad = tmp_path / "r.yaml"
    bad.write_text("name: x\nbase: [unclosed\n")
    with pytest.raises(RecipeError, match=r"r.yaml.*not valid YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    listy = tmp_path / "l.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match="expected a mapping"):
        load_recipe(listy)


def test_relative_paths_resolve_against_the_recipe_file(tmp_path):
    (tmp_path / "sub").mkdir()
    f = tmp_path / "sub" / "r.yaml"
    f.write_text("name: x\nbase: ../models/base\nfinetunes: [../models/a]\npublish: {target: out}\n")
    r = load_recipe(f)
    assert r.base == str((tmp_path / "models" / "base").resolve())
    assert r.finetunes[0].ref == str((tmp_path / "models" / "a").resolve())
    assert r.finetunes[0].label == "a"
    assert r.publish.target == str((tmp_path / "sub" / "out").resolve())


def test_fingerprint_ignores_spelling():
    a = parse_recipe({**BASE, "method": "metagpt"})
    b = parse_recipe({**BASE, "method": {"name": "metagpt"}})
    assert a.fingerprint() == b.fingerprint()
    assert a.fingerprint() != parse_recipe({**BASE, "method": "average"}).fingerprint()
