"""User-facing errors are CkptError subclasses (one line from the CLI), and still the
built-in exception a caller may already catch."""

from __future__ import annotations

import pytest
import torch

from ckpt_core import CheckpointError, CkptError, ConfigError, ConverterSet, ModelWrapper
from ckpt_core.cli import failures
from ckpt_core.errors import DestinationExistsError, NotEnabledError
from ckpt_core.policy.exporter import write_export
from ckpt_core.storage import layout
from ckpt_core.testing.converter_contract import SameNamesAdapter


def test_a_converter_that_is_not_enabled_is_a_config_error_and_a_key_error():
    with pytest.raises(NotEnabledError) as info:
        ConverterSet([])["lora"]
    err = info.value
    assert isinstance(err, ConfigError) and isinstance(err, KeyError)
    assert str(err).startswith("converter 'lora' is not enabled; enabled: none.")
    assert failures.describe(err) == (2, "error: " + str(err))


def test_exporting_onto_an_existing_folder_is_one_line_and_a_file_exists_error(tmp_path):
    model = torch.nn.Linear(4, 4)
    (tmp_path / "step-1").mkdir()
    with pytest.raises(DestinationExistsError) as info:
        write_export(
            ModelWrapper(model),
            str(tmp_path / "step-1"),
            fmt="hf",
            dtype=None,
            sd_adapter=SameNamesAdapter(),
        )
    err = info.value
    assert isinstance(err, CkptError) and isinstance(err, FileExistsError)
    code, line = failures.describe(err)
    assert code == 2 and "step-1 already exists; refusing to overwrite an export" in line


def test_committing_onto_a_committed_folder_is_a_destination_exists_error(tmp_path):
    (tmp_path / ".tmp-step-1").mkdir()
    (tmp_path / "step-1").mkdir()
    with pytest.raises(DestinationExistsError, match="refusing to overwrite a committed folder"):
        layout.commit(str(tmp_path / ".tmp-step-1"), str(tmp_path / "step-1"))


def test_an_export_view_entry_safetensors_cannot_hold_is_a_checkpoint_error(tmp_path):
    class Extra(torch.nn.Linear):
        def get_extra_state(self):
            return {"note": "not a tensor"}

        def set_extra_state(self, state):
            pass

    with pytest.raises(CheckpointError, match="safetensors holds tensors") as info:
        write_export(
            ModelWrapper(Extra(4, 4)),
            str(tmp_path / "out"),
            fmt="hf",
            dtype=None,
            sd_adapter=SameNamesAdapter(),
        )
    assert isinstance(info.value, TypeError)
    assert failures.describe(info.value)[0] == 2
