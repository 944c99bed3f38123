"""I/O stage: where bytes go. Folder layout, commit protocol and writers/readers."""
