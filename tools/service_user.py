"""Print `[service] user` of the config the programs read, for the Makefile.

`make run` started as root passes it to supervisord (`-u`); `make install-service`
uses it, or the name given as the first argument when it is not set. A config that
cannot be read counts as not setting it: the programs say what is wrong with it.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Not resolve(): a private instance (tests) links tools/ into its own folder.
sys.path.insert(0, str(Path(__file__).absolute().parent.parent))

from shared.config import ConfigError, load_config, resolve_config_path  # noqa: E402


def main(argv: list[str]) -> int:
    default = argv[1] if len(argv) > 1 else ""
    try:
        user = load_config(resolve_config_path(None)).service.user
    except ConfigError:
        user = ""
    print(user or default)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
