"""Test-only fault injection for a real daemon process (tests/test_check_faults.py).

Python imports ``sitecustomize`` at start from the first directory on its path that holds one: only a
process started with this directory on ``PYTHONPATH`` *and* ``AGENTAUTHZ_TEST_FAULT`` set gets a fault.
It lives in tests/, which is never installed: no production daemon can load it.
"""

import errno
import os

if os.environ.get("AGENTAUTHZ_TEST_FAULT") == "budgets.charge":
    from agentauthz.authority import budgets

    def _charge(self: object, *args: object, **kwargs: object) -> object:
        """What a failing disk under the budget table looks like to Check."""
        raise OSError(errno.EIO, "injected fault: /srv/secret/state/budgets unreadable")

    budgets.BudgetTable.charge = _charge  # type: ignore[assignment]
