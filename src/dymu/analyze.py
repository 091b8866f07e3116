"""Placeholder until the analyze command lands; registers nothing."""


def add_cli(subparsers) -> None:
    return None
