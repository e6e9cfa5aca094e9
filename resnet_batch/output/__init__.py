"""The one owner of an output folder: parts, state, manifest, ledger, lock and status. Imports nothing above it."""
