"""`covspec keys gen`: CURVE key pairs for edges and devices."""

from __future__ import annotations

import argparse

from covspec.cli.options import add_command


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "keys", "CURVE key pairs for edges and devices")
    keys_sub = p.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    q = add_command(keys_sub, "gen", "write NAME.key (public) and NAME.key_secret (secret) into a folder")
    q.add_argument("--out", required=True, help="folder to write the key pair into")
    q.add_argument("--name", default="device", help="file name stem")
    q.add_argument("--force", action="store_true", help="overwrite an existing pair of that name")
    q.set_defaults(handler=run_gen)


def run_gen(args: argparse.Namespace) -> int:
    from covspec.transport.channel import generate_keys

    public, secret = generate_keys(args.out, args.name, overwrite=args.force)
    print(f"public key {public} (give it to the other side; an edge admits the devices whose public keys "
          f"are in its --allow folder)\nsecret key {secret} (keep it here: --key)")
    return 0
