"""Which licenses let a derived model be shared freely, and what to say when one does not.

A fine-tune carries its parent's license (training copies it into the child's manifest);
`list`, `show` and the exported model card say so when that license is not permissive,
so a restriction upstream is never lost downstream. The ids are the Hub's license ids
(https://huggingface.co/docs/hub/repositories-licenses).
"""

from __future__ import annotations

# Hub license ids that allow redistribution and derived works with attribution only.
PERMISSIVE = frozenset({
    "apache-2.0", "mit", "afl-3.0", "bsl-1.0", "bsd", "bsd-2-clause", "bsd-3-clause",
    "bsd-3-clause-clear", "cc0-1.0", "cc-by-2.0", "cc-by-2.5", "cc-by-3.0", "cc-by-4.0",
    "cdla-permissive-1.0", "cdla-permissive-2.0", "ecl-2.0", "etalab-2.0", "isc", "ms-pl",
    "ncsa", "odc-by", "pddl", "postgresql", "unlicense", "wtfpl", "zlib",
})

# Every license id the Hub's `license:` field accepts (anything else is `other` plus a
# `license_name`).
HUB_IDS = PERMISSIVE | frozenset({
    "openrail", "bigscience-openrail-m", "creativeml-openrail-m", "bigscience-bloom-rail-1.0",
    "bigcode-openrail-m", "artistic-2.0", "c-uda", "cc", "cc-by-sa-3.0", "cc-by-sa-4.0",
    "cc-by-nc-2.0", "cc-by-nc-3.0", "cc-by-nc-4.0", "cc-by-nd-4.0", "cc-by-nc-nd-3.0",
    "cc-by-nc-nd-4.0", "cc-by-nc-sa-2.0", "cc-by-nc-sa-3.0", "cc-by-nc-sa-4.0",
    "cdla-sharing-1.0", "epl-1.0", "epl-2.0", "eupl-1.1", "eupl-1.2", "agpl-3.0", "gfdl",
    "gpl", "gpl-2.0", "gpl-3.0", "lgpl", "lgpl-2.1", "lgpl-3.0", "h-research",
    "intel-research", "lppl-1.3c", "apple-ascl", "apple-amlr", "mpl-2.0", "odbl",
    "openrail++", "osl-3.0", "ofl-1.1", "lgpl-lr", "deepfloyd-if-license",
    "fair-noncommercial-research-license", "llama2", "llama3", "llama3.1", "llama3.2",
    "llama3.3", "llama4", "gemma", "unknown", "other",
})


def is_permissive(license: str | None) -> bool:
    return (license or "").lower() in PERMISSIVE


def inherited_note(parent_license: str | None, has_parent: bool) -> str | None:
    """What a child says about the license it carries: None without a parent, or when the
    parent's license is permissive or unknown (an unknown one already reads "unknown")."""
    if not has_parent or not parent_license or parent_license == "unknown" \
            or is_permissive(parent_license):
        return None
    return f"inherited from the parent: {parent_license} is not a permissive license"
