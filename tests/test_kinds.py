"""The registry of kinds: settings from ``--set`` values, the row schema, kinds named by module."""

from __future__ import annotations

import pytest

from flipad import DetectorSettings, ReconstructionLossDetector, family_settings
from flipad.kinds import DETECTOR_KINDS, detector_class, diagnostic_columns
from flipad.scoring import item_columns, item_schema, served_columns


def test_set_values_are_typed_by_the_kinds_settings():
    settings = family_settings({"reconstruction": {"encoder_steps": "500", "method": "adam",
                                                   "perturbations": "jpeg q90, jpeg q80"},
                                "flipad": {"constrained": "true", "epochs": 7}})
    own = settings["reconstruction"]
    assert (own.encoder_steps, own.method, own.perturbations) == (500, "adam", ("jpeg q90", "jpeg q80"))
    assert settings["flipad"].constrained is True and settings["flipad"].epochs == 7
    assert family_settings({"combined": {}}) == {"attribution": DETECTOR_KINDS["attribution"].Settings()}
    detector_settings = DetectorSettings(families=settings)
    assert detector_settings.of(ReconstructionLossDetector) is own
    params = detector_settings.as_params()
    assert params["reconstruction.encoder_steps"] == 500 and params["flipad.constrained"] is True
    assert "progress" not in params


@pytest.mark.parametrize(("values", "message"), [
    ({"reconstruction": {"encoder_step": "5"}}, "--set reconstruction.encoder_step: unknown setting; reconstruction has"),
    ({"reconstruction": {"encoder_steps": "many"}}, "--set reconstruction.encoder_steps=many: expected int"),
    ({"reconstruction": {"method": "lbfgs"}}, "reconstruction.method 'lbfgs': use one of adam, encoder-lm"),
    ({"flipad": {"constrained": "maybe"}}, "--set flipad.constrained=maybe: expected bool"),
    ({"nosuch": {"a": "1"}}, "--set nosuch.*: unknown detector kind 'nosuch'"),
])
def test_a_wrong_setting_is_one_line_naming_it(values, message):
    with pytest.raises(ValueError) as info:
        family_settings(values)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_the_row_schema_is_built_from_the_registered_kinds():
    columns = item_columns()
    assert list(diagnostic_columns())[:3] == ["residual", "sparsity", "latent_loss"]  # then kinds tests register
    assert columns[:4] == ["score", "threshold", "is_generated", "error"]
    assert columns[4:4 + len(diagnostic_columns())] == list(diagnostic_columns())
    schema = {c.name: c for c in item_schema()}
    assert schema["latent_loss"].dtype == "double" and schema["latent_loss"].meaning
    assert all(c.meaning for c in schema.values())
    assert [c.name for c in served_columns()] == ["score", "threshold", "is_generated", "error", "verdict", "reason",
                                                  "key_id", "key_bits_correct", "key_p_value"]


def test_a_kind_is_found_by_its_module():
    assert detector_class("flipad.detectors.verdict:combined") is DETECTOR_KINDS["attribution"]
    with pytest.raises(ValueError, match="cannot import 'no_such_package'"):
        detector_class("no_such_package:kind")
    with pytest.raises(ValueError, match="unknown detector kind 'nosuch'; known kinds: "):
        detector_class("nosuch")
