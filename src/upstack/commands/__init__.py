"""CLI subcommands. Each module defines `ORDER` (position in --help) and `register(subparsers, common)`.

Modules here only parse arguments into a stage config and call the stage function; they import
torch/transformers lazily, inside the command function.
"""
