"""The error base every package's reported errors share, and the refusal marker of the deployment."""

from __future__ import annotations


class HermesError(Exception):
    """Base of the errors this project reports as one line (the CLI root prints them without a traceback)."""


class UserError(HermesError):
    """A problem the user can fix (bad path, bad option, missing tool). Printed as one line."""


# The stable marker the deployment's own models put at the start of every request they refuse
# (model_repo/triton_models/common.py sends it, client.errors reads it): in-band stream errors carry no
# status code, so clients classify refusals by it, not by wording.
BAD_REQUEST_MARKER = "invalid request: "
