"""The owner's master secret, from where the flows are told to take it; never from their parameters."""

from __future__ import annotations

from flipad.keys import check_secret, read_secret_file, secret_from_environment

__all__ = ["master_secret"]


def master_secret(secret_file: str | None = None, secret_block: str | None = None) -> bytes | None:
    """The owner's master secret (key sets, and any detector kind that declares a secret):
    ``secret_file``, the Prefect ``Secret`` block ``secret_block``, or the environment
    (:func:`flipad.keys.secret_from_environment`); None when none is given. Only where it comes
    from travels in the flows' parameters, never the secret."""
    if secret_file:
        return read_secret_file(secret_file)
    if secret_block:
        from prefect.blocks.system import Secret

        return check_secret(str(Secret.load(secret_block).get()).encode(), f"Prefect Secret block {secret_block!r}")
    return secret_from_environment()
