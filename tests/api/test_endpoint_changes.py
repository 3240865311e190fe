"""An edit's change in words, as the endpoint's events and `appliance apply` say it."""

from __future__ import annotations

from api import endpoint_changes


def test_a_changed_map_names_the_keys_that_changed_and_never_their_values() -> None:
    """A change to a map (server settings, env, labels) names the keys added, removed or given
    another value, so the events say what an edit did ("args changed" said nothing), and no
    value: env values may be secrets."""
    change = {
        "args": [
            {"max_model_len": 1024, "dtype": "bfloat16"},
            {"max_model_len": 1024, "quantization": "awq"},
        ],
        "env": [{"HF_TOKEN": "hf_old"}, {"HF_TOKEN": "hf_new"}],
        "max_replicas": [1, 2],
    }
    said = endpoint_changes.summary(change)
    assert said == "args changed (dtype, quantization), env changed (HF_TOKEN), max replicas 1 → 2"
    assert "hf_" not in said and "awq" not in said
    assert endpoint_changes.summary({"labels": [[], ["a"]]}) == "labels changed"
