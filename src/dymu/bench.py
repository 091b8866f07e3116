"""Placeholder until the bench command lands; registers nothing."""


def add_cli(subparsers) -> None:
    return None
