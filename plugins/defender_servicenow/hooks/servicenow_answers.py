"""How the ServiceNow hook reads the instance's answers: the hibernation page, truncated or non-JSON
bodies and HTTP errors become plain :mod:`~defender_servicenow.exceptions` errors that say what the
instance answered and what to do (no I/O here).
"""

from __future__ import annotations

from typing import Any

import requests

from defender_servicenow.exceptions import (
    ServiceNowAuthError,
    ServiceNowBadResponseError,
    ServiceNowError,
    ServiceNowForbiddenError,
    ServiceNowHibernatingError,
    ServiceNowInvalidTableError,
    ServiceNowRateLimitedError,
    ServiceNowTransactionCancelledError,
    ServiceNowUnavailableError,
)


class ServiceNowAnswers:
    """Mixin of :class:`~defender_servicenow.hooks.servicenow.ServiceNowHook`: it uses the hook's
    ``settings``, ``instance_host``, ``_excerpt`` (secrets blanked) and ``_guard_rejected`` (lock-out guard).
    """

    def _check_hibernating(self, resp: requests.Response) -> None:
        location = resp.headers.get("Location", "")
        text = resp.text[:4000] if "html" in resp.headers.get("Content-Type", "").lower() else ""
        if "hibernat" in text.lower() or (300 <= resp.status_code < 400 and "developer.servicenow.com" in location):
            raise ServiceNowHibernatingError(
                f"The instance {self.instance_host} is hibernating (it answered its hibernation page instead "
                "of the API). Wake it by signing in at https://developer.servicenow.com, then run the task "
                "again", status=resp.status_code, answer="Instance Hibernating page")

    def _json(self, method: str, path: str, resp: requests.Response) -> Any:
        try:
            return resp.json()
        except ValueError:
            pass
        text = resp.text or ""
        if "Transaction cancelled" in text or text.lstrip()[:1] in ("{", "["):
            raise ServiceNowTransactionCancelledError(
                f"{method} {path}: the answer was cut off (truncated JSON"
                f"{', Transaction cancelled: maximum execution time exceeded' if 'Transaction cancelled' in text else ''}"
                "). The instance cancelled a transaction that ran too long: ask for fewer rows or fields "
                "(smaller page or batch size) and run the task again", status=resp.status_code,
                answer=self._excerpt(text))
        raise ServiceNowBadResponseError(
            f"{method} {path}: expected JSON but {self.instance_host} answered "
            f"{resp.headers.get('Content-Type') or 'no content type'} starting with {self._excerpt(text)!r}. "
            "Check that the host is the instance URL without a path and that the user may use the REST API",
            status=resp.status_code, answer=self._excerpt(text))

    def _raise_for(self, method: str, path: str, resp: requests.Response) -> None:
        status = resp.status_code
        try:
            err = (resp.json() or {}).get("error") or {}
        except (ValueError, AttributeError):
            err = {}
        if not isinstance(err, dict):
            err = {"message": str(err)}
        message, detail = err.get("message") or "", err.get("detail") or ""
        said = "; ".join(filter(None, (str(message), str(detail)))) or self._excerpt(resp.text) or "(no body)"
        said = self._excerpt(said)
        where = f"{method} {path} answered HTTP {status}: {said}"
        kw = {"status": status, "answer": said}
        if status == 401:
            self._guard_rejected(f"{method} {path} answered HTTP 401")
            raise ServiceNowAuthError(f"{where}. The {self.settings.auth_type} credentials of connection "
                                      f"{self.settings.conn_id!r} were not accepted: check them", **kw)
        if status == 400 and str(message).startswith("Invalid table"):
            raise ServiceNowInvalidTableError(f"{where}. The table does not exist on {self.instance_host} "
                                              "(is its plugin installed?) or the user cannot see it", **kw)
        if status == 403:
            what = "a data policy" if "Data Policy" in said else "an ACL"
            raise ServiceNowForbiddenError(f"{where}. {what} refused it: give the integration user the "
                                           "needed roles or send the mandatory fields", **kw)
        if status == 429:
            wait = resp.headers.get("Retry-After") or "?"
            raise ServiceNowRateLimitedError(
                f"{where}. Still rate limited after retries (Retry-After {wait} s). Set the connection extra "
                "requests_per_hour to the instance's rate limit, or raise that limit", **kw)
        if status >= 500:
            raise ServiceNowUnavailableError(f"{where}. The instance is failing or overloaded; run the task "
                                             "again later", **kw)
        raise ServiceNowError(f"{where}.", **kw)
