"""Shared infrastructure: atomic writes leave no partial file, and the host's CPU is described for speed claims."""

from pocketformer import store


def test_atomic_json_write_leaves_only_the_final_file(tmp_path):
    store.write_json(tmp_path / "a" / "r.json", {"x": 1})
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]
    assert (tmp_path / "a" / "r.json").read_text().strip().startswith("{")


def test_cpu_names_a_model_and_only_known_features():
    info = store.cpu()
    assert info["model"] and set(info["features"]) <= set(store.CPU_FEATURES)
    assert info["features"] == [f for f in store.CPU_FEATURES if f in info["features"]]  # in the listed order
