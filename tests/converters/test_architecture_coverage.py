"""Every architecture the converters accept has a tiny synthesised model, so every test over TINY_MODELS covers it."""

from __future__ import annotations

from synth_models import BASE_CONFIG, TINY_MODELS

from converters.architectures import ARCHITECTURES, architecture_for_config


def architectures_without_a_tiny_model(architecture_names: list[str], tiny_models: dict) -> list[str]:
    covered = {architecture_for_config({**BASE_CONFIG, **overrides}).name for _, overrides in tiny_models.values()}
    return [name for name in architecture_names if name not in covered]


def test_every_supported_architecture_has_a_tiny_test_model():
    missing = architectures_without_a_tiny_model([arch.name for arch in ARCHITECTURES], TINY_MODELS)
    assert not missing, (f"architectures with no tiny model in tests/synth_models.py TINY_MODELS: {missing}; "
                         "add one so the converters, engines and server are tested on it")


def test_an_architecture_added_without_a_tiny_model_is_reported():
    names = [arch.name for arch in ARCHITECTURES]
    assert architectures_without_a_tiny_model([*names, "granite"], TINY_MODELS) == ["granite"]
    without_phi3 = {name: spec for name, spec in TINY_MODELS.items() if not name.startswith("phi3")}
    assert architectures_without_a_tiny_model(names, without_phi3) == ["phi3"]
