"""The structure record of a pruned model (`config.pgprune`), read with pgprune's errors.

The record types (`StructureRecord`, `LayerRecord`, `DenseSizes`) are defined in
`pgprune.models.pruned_modeling`, because that file is shipped inside every exported folder and
must build the model without pgprune; pgprune uses the same classes. There a malformed record is a
`StructureError` (a ValueError); `read_structure` turns it into a ModelLoadError that says what to do.
"""

from __future__ import annotations

from pgprune.errors import ModelLoadError
from pgprune.models.pruned_modeling import CONFIG_KEY, StructureError, StructureRecord


def read_structure(config, where: str = "the model") -> StructureRecord | None:
    """The structure record of a config or model; None when it is not pruned."""
    try:
        return StructureRecord.of(config)
    except StructureError as e:
        raise ModelLoadError(f"{where} has a malformed pgprune structure record (config.{CONFIG_KEY}): {e}. "
                             "Export the model again with `pgprune apply` (or pgprune.export.save_pruned)") from e
