"""`vigil keys`: make an API key entry, check a key file.

    vigil keys add --name web --tenant acme --requests-per-second 20 >> keys.yml
    vigil keys check keys.yml

`add` prints the key file entry (with the secret's SHA-256, never the secret) on
standard output and the secret itself once, on standard error, so that appending the
output to the key file never writes the secret there.
"""

from __future__ import annotations

import datetime as dt
import sys

from eventbus.apikeys import ApiKey, KeyFileError, KeyLimits, entry_yaml, hash_secret, load_keys, new_secret, parse_keys


def add_parser(sub, option) -> None:
    keys = sub.add_parser("keys", help="make API key entries and check key files",
                          description="API keys for `vigil serve --auth-keys FILE`.")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    add = ks.add_parser("add", help="make a new key: the entry on stdout, the secret once on stderr",
                        description="Make a random secret and its key file entry. The entry (with the "
                                    "secret's SHA-256) goes to standard output, to append to the key file; the "
                                    "secret goes to standard error, once: give it to the client now.")
    add.add_argument("--name", required=True, help="the key's name (metrics and logs): letters, digits, . _ -")
    add.add_argument("--tenant", required=True, help="the tenant recorded in the events of its requests")
    add.add_argument("--admin", action="store_true", help="may call the admin methods (load, unload, traffic)")
    add.add_argument("--requests-per-second", type=float, help="request rate limit (token bucket)")
    add.add_argument("--burst", type=float, help="requests allowed at once above the rate (default: the rate)")
    add.add_argument("--tokens-per-minute", type=float, help="prompt plus completion tokens per minute")
    add.add_argument("--max-streams", type=int, help="calls in flight at once")
    add.add_argument("--expires", help="ISO 8601 date or time after which the key is refused")
    check = ks.add_parser("check", help="check a key file", description="Check a key file; exit 1 naming the "
                          "file, line and field of the first problem.")
    check.add_argument("file", help="the key file (YAML or JSON)")


def run(args) -> int:
    if args.keys_command == "check":
        try:
            keys = load_keys(args.file)
        except KeyFileError as e:
            print(f"vigil keys check: {e}", file=sys.stderr)
            return 1
        now = dt.datetime.now(dt.timezone.utc)
        for k in sorted(keys.values(), key=lambda k: k.line):
            notes = [f"tenant {k.tenant}", "admin" if k.admin else "no admin"]
            if k.expires is not None:
                notes.append(("expired " if k.expires <= now else "expires ") + f"{k.expires:%Y-%m-%dT%H:%M:%SZ}")
            print(f"  {k.name}: {', '.join(notes)}")
        print(f"{args.file}: {len(keys)} keys, ok")
        return 0
    secret = new_secret()
    key = ApiKey(name=args.name, tenant=args.tenant, sha256=hash_secret(secret), admin=args.admin,
                 limits=KeyLimits(requests_per_second=args.requests_per_second, burst=args.burst,
                                  tokens_per_minute=args.tokens_per_minute, max_streams=args.max_streams))
    text = entry_yaml(key)
    if args.expires:
        text = text.rstrip("\n") + f"\n  expires: '{args.expires}'\n"
    try:
        parse_keys(text, "the new entry")  # the same checks as the server's
    except KeyFileError as e:
        print(f"vigil keys add: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    sys.stdout.flush()
    print(f"vigil keys add: the secret of key {args.name!r}, shown only now; the client sends it as "
          f"'authorization: Bearer <secret>':\n{secret}", file=sys.stderr)
    return 0

