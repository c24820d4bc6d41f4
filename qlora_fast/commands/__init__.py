"""CLI commands, one module each (see qlora_fast/cli.py)."""
