"""Architecture adapters: one per model family, found through the `mstore.adapters` entry points."""
