"""Palisade: a hardened inbound SMTP gateway (a spam perimeter in front of the mail store).

The package is split by job (README, "Architecture"; DESIGN.md section 4), each package's
``__init__`` saying what it owns, what it must not touch and how far it trusts its input:
``smtp`` is the sans-I/O protocol core; ``conversation`` the SMTP conversation without I/O
(stages, replies, log lines); ``policy`` turns facts into verdicts and decides relay control;
``ports`` are the interfaces to the outside world and ``adapters`` implement them (DNS, state
store, LDAP, scanners); ``spool`` keeps accepted mail durable; ``delivery`` delivers it;
``server`` is the processes, sockets and asyncio glue with the composition root; ``config`` loads
the operator's TOML and builds the policy from it; ``obs`` writes log lines; ``cli`` is the
``palisade`` command. Trust: all network input is hostile until the SMTP core and the checks
have parsed it; operator files are checked completely before they are used.
"""

__version__ = "0.6.0"


def installed_version() -> str:
    """The version of the installed distribution (its metadata, what ``pip`` installed), or
    ``__version__`` when the package runs from a tree that was never installed."""
    from importlib import metadata

    try:
        return metadata.version("palisade")
    except metadata.PackageNotFoundError:
        return __version__
