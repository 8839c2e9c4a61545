"""Models in and out: the Hugging Face Hub client side, import (with its checks, stat cache
and per-source lock) and export to a Hugging Face folder.

Builds on mstore.store and the adapters' torch-free checks; torch only inside export's
and the adapters' own functions.
"""
