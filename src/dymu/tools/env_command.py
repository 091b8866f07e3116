"""`dymu env`: versions and device, what each family offers (--families) and the self-test (--check) (the
parser is in `dymu.cli`)."""

from __future__ import annotations


def cmd_env(args) -> int:
    from . import env

    for line in env.version_lines():
        print(line)
    for line in env.device_lines(args.device, args.dtype):
        print(line)
    if args.families:
        from ..families.base import feature_matrix

        print()
        print(feature_matrix())
    if not args.check:
        return 0
    results = env.run_checks(args.device, args.dtype, args.attn_implementation)
    failed = [r.family for r in results if not r.ok]
    print(f"self-test: {len(results) - len(failed)} passed, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 1 if failed else 0
