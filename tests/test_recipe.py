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


def test_runner_defaults_to_local_and_accepts_dask_forms():
    assert parse_recipe(BASE).runner.kind == "local"
    assert parse_recipe(BASE).shared_storage is None
    r = parse_recipe({**BASE, "runner": "dask", "results": "s3://bkt/results"})
    assert r.runner.kind == "dask" and r.runner.cluster is None and r.shared_storage == "s3://bkt/results/shared"
    r = parse_recipe({**BASE, "runner": {"kind": "dask", "address": "tcp://sched:8786", "storage": "s3://bkt/x"}})
    assert r.runner.address == "tcp://sched:8786" and r.shared_storage == "s3://bkt/x"
    r = parse_recipe({**BASE, "runner": {"kind": "dask", "cluster": {"n_workers": 4, "memory_limit": "16GiB"}}})
    assert (r.runner.cluster.n_workers, r.runner.cluster.threads_per_worker, r.runner.cluster.memory_limit) == (4, 1, "16GiB")


@pytest.mark.parametrize(
    ("runner", "fragment"),
    [
        ({"kind": "k8s"}, "runner.kind"),
        ({"kind": "local", "address": "tcp://x:1"}, "runner: 'address' applies only to kind 'dask'"),
        ({"kind": "dask", "address": "tcp://x:1", "cluster": {}}, "either 'address'"),
        ({"kind": "dask", "cluster": {"n_workerz": 2}}, "runner.cluster.n_workerz: unknown key"),
        ({"kind": "dask", "cluster": {"n_workers": 0}}, "runner.cluster.n_workers"),
        ({"kind": "dask", "address": "sched:8786"}, "runner.address"),
        ({"kind": "dask", "storage": "/shared"}, "runner.storage"),
    ],
)
def test_runner_errors_name_the_key(runner, fragment):
    with pytest.raises(RecipeError, match=fragment.replace("(", r"\(")):
        parse_recipe({**BASE, "runner": runner})


def test_model_card_front_matter_names_hub_models_only():
    from metamerge.pipeline.card import front_matter, paper_links

    recipe = parse_recipe({"name": "m", "base": "hf://org/base@abc", "method": "ties",
                           "finetunes": [{"ref": "hf://org/ft@1", "tasks": ["b", "a"]}, {"ref": "/local/other", "tasks": ["a"]}]})
    matter = front_matter(recipe)
    assert matter == {"library_name": "transformers", "tags": ["merge", "metamerge", "ties"],
                      "base_model": ["org/base", "org/ft"], "metamerge": {"evaluated_on": ["a", "b"]}}
    assert paper_links("X (arXiv 2306.01708)") == "X ([arXiv 2306.01708](https://arxiv.org/abs/2306.01708))"
