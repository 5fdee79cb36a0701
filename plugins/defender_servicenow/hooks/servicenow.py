"""ServiceNow hook: Table API, Batch API and IRE over one pooled, retrying session (I/O only).

Connection (conn type ``servicenow``): host = instance URL (no scheme means https), login/password,
extras ``client_id``, ``client_secret``, ``auth_type`` (``oauth_password`` default with a client id,
``oauth_client_credentials``, ``basic`` default otherwise), ``verify``, ``proxy``, ``timeout`` (30) and
``requests_per_hour`` (optional client-side pace). Transport and retry rules: :mod:`._http`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import Any
from urllib.parse import urlsplit

import requests
from airflow.sdk import BaseHook
from airflow.sdk.log import mask_secret

from defender_servicenow.exceptions import (
    ServiceNowAuthError,
    ServiceNowBadResponseError,
    ServiceNowError,
    ServiceNowInvalidTableError,
    ServiceNowUnavailableError,
)
from defender_servicenow.hooks._http import Pacer, build_session, make_retry
from defender_servicenow.hooks.servicenow_answers import ServiceNowAnswers
from defender_servicenow.hooks.servicenow_connection import (  # noqa: F401  (re-exported for callers)
    AUTH_TYPES,
    ServiceNowSettings,
    parse_connection,
)
from defender_servicenow.hooks.servicenow_wire import (  # noqa: F401  (re-exported for callers)
    MAX_QUERY_CHARS,
    BatchRequest,
    BatchResponse,
    in_queries,
    ire_item_errors,
    sys_id_of,
)
from defender_servicenow.hooks.servicenow_wire import batch_item as _batch_item
from defender_servicenow.hooks.servicenow_wire import batch_response as _batch_response
from defender_servicenow.hooks.servicenow_wire import next_offset as _next_offset

TOKEN_PATH = "/oauth_token.do"
BATCH_PATH = "/api/now/v1/batch"
_TABLE_NAME = re.compile(r"^[A-Za-z0-9_]+$")
_EXCERPT = 200


@dataclass
class _Token:
    access: str
    refresh: str | None
    expires_at: float
    grant: str


class ServiceNowHook(ServiceNowAnswers, BaseHook):
    """Talk to a ServiceNow instance: Table API, Batch API and the IRE.

    :param servicenow_conn_id: the Airflow connection (conn type ``servicenow``).
    :param max_retry_time: seconds all retries of one call may take together (waits included).
    :param batch_size: items per Batch API call.
    """

    conn_name_attr = "servicenow_conn_id"
    default_conn_name = "servicenow_default"
    conn_type = "servicenow"
    hook_name = "ServiceNow"

    def __init__(self, servicenow_conn_id: str = default_conn_name, *, max_retry_time: float = 300.0,
                 batch_size: int = 100, auth_guard: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.auth_guard = auth_guard   # hooks.lockout.AuthGuard: no login after rejected credentials
        self._guard_checked = False
        self.servicenow_conn_id = servicenow_conn_id
        self.max_retry_time = max_retry_time
        self.batch_size = batch_size
        self.request_count = 0
        self.token_count = 0
        self._token: _Token | None = None
        self._token_lock = threading.Lock()
        self._clock = time.monotonic

    # ----------------------------------------------------------------------------------- plumbing

    @cached_property
    def settings(self) -> ServiceNowSettings:
        return parse_connection(self.get_connection(self.servicenow_conn_id))

    @property
    def base_url(self) -> str:
        return self.settings.base_url

    @property
    def instance_host(self) -> str:
        return urlsplit(self.settings.base_url).hostname or ""

    @cached_property
    def pacer(self) -> Pacer:
        return Pacer(self.settings.requests_per_hour)

    @cached_property
    def session(self) -> requests.Session:
        s = self.settings
        session = build_session(verify=s.verify, proxy=s.proxy,
                                retry=make_retry(max_retry_time=self.max_retry_time, pacer=self.pacer))
        if s.auth_type == "basic":
            session.auth = (s.username, s.password)
        return session

    def get_conn(self) -> requests.Session:
        return self.session

    def close(self) -> None:
        """Close the pooled connections (the hook can still be used: a new session is made)."""
        if "session" in self.__dict__:
            self.__dict__.pop("session").close()

    @property
    def _send_options(self) -> dict:
        # Passed per request: requests lets environment variables override session.verify/proxies.
        s = self.settings
        proxies = {"http": s.proxy, "https": s.proxy} if s.proxy else None
        return {"verify": s.verify, "proxies": proxies, "timeout": s.timeout, "allow_redirects": False}

    def _excerpt(self, text: str) -> str:
        """The first bytes of an answer, for people, with every known secret blanked out."""
        text = (text or "")[:_EXCERPT * 4]
        secrets = self.settings.secrets + ([self._token.access, self._token.refresh or ""] if self._token else [])
        for secret in filter(None, secrets):
            text = text.replace(secret, "***")
        return " ".join(text.split())[:_EXCERPT]

    def _http(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Send one request (urllib3 retries inside); transport failures become plain errors."""
        if self.auth_guard is not None and not self._guard_checked:
            self._guard_checked = True
            suspended = self.auth_guard.check(self._guard_material())
            if suspended:
                raise ServiceNowAuthError(suspended, status=401)
        self.pacer.wait()
        self.request_count += 1
        url = self.base_url + path
        try:
            return self.session.request(method, url, **self._send_options, **kwargs)
        except requests.exceptions.SSLError as exc:
            self._guard_unreachable(method, path, exc)
            raise ServiceNowUnavailableError(
                f"TLS verification failed for {self.base_url} ({type(exc.__context__ or exc).__name__}). "
                "Set the connection extra verify to the path of the instance's CA bundle "
                "(or false, only for a test instance)") from None
        except requests.exceptions.ProxyError as exc:
            self._guard_unreachable(method, path, exc)
            proxy = urlsplit(self.settings.proxy or "")
            raise ServiceNowUnavailableError(
                f"The proxy {proxy.hostname}:{proxy.port} refused or failed {method} {path}: check the "
                "connection extra proxy") from None
        except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
            self._guard_unreachable(method, path, exc)
            raise ServiceNowUnavailableError(
                f"{method} {path} on {self.base_url} failed after retries ({type(exc).__name__}): the instance "
                f"is unreachable or too slow (timeout {self.settings.timeout:g} s). Check the host, network "
                "and proxy, then run the task again") from None
        except (requests.exceptions.ChunkedEncodingError, requests.exceptions.ContentDecodingError) as exc:
            raise ServiceNowUnavailableError(
                f"{method} {path} on {self.base_url}: the answer was cut off part way ({type(exc).__name__}); "
                "the instance or a proxy dropped the connection. Run the task again") from None
        except OSError as exc:  # e.g. the CA bundle named by verify does not exist
            raise ServiceNowError(f"{method} {path} could not be sent: {exc}. Check the connection extras "
                                  "verify (a CA bundle path must exist on the worker) and proxy") from None

    # ----------------------------------------------------------------------------------- auth

    def _guard_material(self) -> str:
        s = self.settings
        return "|".join(str(v) for v in (s.base_url, s.auth_type, s.username, s.password, s.client_id,
                                         s.client_secret))

    def _guard_rejected(self, message: str) -> None:
        if self.auth_guard is not None:
            self.auth_guard.rejected(self._guard_material(), message)

    def _guard_unreachable(self, method: str, path: str, exc: Exception) -> None:
        """Record the connection as unreachable (the sync health page shows it; it suspends nothing)."""
        if self.auth_guard is not None:
            self.auth_guard.unreachable(f"{method} {path} could not reach {self.instance_host} "
                                        f"({type(exc).__name__})")

    def _bearer(self, *, renew: bool = False) -> str:
        with self._token_lock:
            tok = self._token
            if tok and not renew and self._clock() < tok.expires_at:
                return tok.access
            self._token = self._obtain_token(tok)
            return self._token.access

    def _obtain_token(self, old: _Token | None) -> _Token:
        s = self.settings
        base = {"client_id": s.client_id, "client_secret": s.client_secret}
        if s.auth_type == "oauth_client_credentials":
            return self._token_request("client_credentials", base)
        if old and old.refresh:
            try:
                return self._token_request("refresh_token", {**base, "refresh_token": old.refresh})
            except ServiceNowAuthError as exc:
                self.log.info("The refresh token was rejected (%s); requesting a new password grant", exc.answer)
        return self._token_request("password", {**base, "username": s.username, "password": s.password})

    def _token_request(self, grant: str, form: dict) -> _Token:
        started = self._clock()
        resp = self._http("POST", TOKEN_PATH, data={"grant_type": grant, **form})
        self.token_count += 1
        self._check_hibernating(resp)
        try:
            data = resp.json()
        except ValueError:
            data = None
        if resp.status_code != 200 or not isinstance(data, dict) or "access_token" not in data:
            said = (f"{data.get('error')}: {data.get('error_description')}" if isinstance(data, dict)
                    and "error" in data else self._excerpt(resp.text) or "(empty answer)")
            hint = {"password": "Check the connection's login/password and the extras client_id/client_secret "
                                "(the OAuth client must allow this user).",
                    "refresh_token": "The hook falls back to a new password grant.",
                    "client_credentials": "Check client_id/client_secret, that the property "
                    "glide.oauth.inbound.client.credential.grant_type.enabled is true and that the OAuth "
                    "client has an OAuth Application User."}[grant]
            if resp.status_code in (400, 401) and grant != "refresh_token":
                self._guard_rejected(f"OAuth {grant} grant refused (HTTP {resp.status_code})")
            raise ServiceNowAuthError(
                f"OAuth {grant} grant refused by {self.base_url}{TOKEN_PATH} (HTTP {resp.status_code}, "
                f"the instance said {said!r}). {hint}", status=resp.status_code, answer=said)
        access, refresh = str(data["access_token"]), data.get("refresh_token")
        mask_secret(access)
        if refresh:
            mask_secret(str(refresh))
        try:
            lifetime = max(0.0, float(data.get("expires_in", 1800)))
        except (TypeError, ValueError):
            lifetime = 1800.0
        margin = min(60.0, lifetime * 0.1)  # renew shortly before expiry: 60 s for the default 30 min
        self.log.info("Obtained an OAuth access token (%s grant) from %s, valid for %g s",
                      grant, self.instance_host, lifetime)
        return _Token(access, str(refresh) if refresh else None, started + lifetime - margin, grant)

    # ----------------------------------------------------------------------------------- requests

    def _request(self, method: str, path: str, *, params: dict | None = None, json_body: Any = None,
                 allow_404: bool = False) -> tuple[Any, requests.Response]:
        """Send an authenticated API call; return ``(parsed JSON or None, response)``.

        With OAuth a 401 is answered once with a fresh token (a token may expire between our check and
        the instance's); a second 401 is an authentication error.
        """
        oauth = self.settings.auth_type != "basic"
        for attempt in (1, 2):
            headers = {"Authorization": f"Bearer {self._bearer(renew=attempt == 2)}"} if oauth else {}
            if json_body is not None:
                headers["Content-Type"] = "application/json"
            resp = self._http(method, path, params=params, headers=headers,
                              data=None if json_body is None else json.dumps(json_body))
            if resp.status_code == 401 and oauth and attempt == 1:
                self.log.info("%s %s answered 401 with the current token; retrying once with a new one",
                              method, path)
                continue
            break
        self._check_hibernating(resp)
        if resp.status_code == 404 and allow_404:
            return None, resp
        if resp.status_code >= 300:
            self._raise_for(method, path, resp)
        if self.auth_guard is not None:
            self.auth_guard.accepted()
        if resp.status_code == 204 or not resp.content:
            return None, resp
        return self._json(method, path, resp), resp

    # ----------------------------------------------------------------------------------- Table API

    @staticmethod
    def _table_path(table: str, sys_id: str | None = None) -> str:
        if not _TABLE_NAME.match(table or ""):
            raise ServiceNowInvalidTableError(f"{table!r} is not a valid table name (letters, digits, _)")
        if sys_id is not None and not re.match(r"^[A-Za-z0-9_.\-]+$", sys_id):
            raise ServiceNowError(f"{sys_id!r} is not a valid sys_id")
        return f"/api/now/table/{table}" + (f"/{sys_id}" if sys_id else "")

    @staticmethod
    def _fields(fields: Iterable[str] | str | None) -> dict:
        if not fields:
            return {}
        return {"sysparm_fields": fields if isinstance(fields, str) else ",".join(fields)}

    def get_record(self, table: str, sys_id: str, fields: Iterable[str] | None = None) -> dict | None:
        """One record by sys_id, or None when it does not exist."""
        data, _ = self._request("GET", self._table_path(table, sys_id), allow_404=True,
                                params={"sysparm_exclude_reference_link": "true", **self._fields(fields)})
        return None if data is None else data.get("result")

    def iter_records(self, table: str, query: str = "", fields: Iterable[str] | None = None,
                     page_size: int = 1000) -> Iterator[dict]:
        """Every matching record, page by page, following ``Link rel="next"`` in ``sys_id`` order.

        Short or empty pages (the limit is applied before ACLs) do not end the crawl; the bogus
        ``rel="prev"`` with offset -1 on the first page is ignored.
        """
        order = "" if "ORDERBYsys_id" in query else "ORDERBYsys_id"
        params = {"sysparm_query": "^".join(filter(None, (query, order))), "sysparm_limit": page_size,
                  "sysparm_offset": 0, "sysparm_exclude_reference_link": "true", **self._fields(fields)}
        path, pages, rows = self._table_path(table), 0, 0
        while True:
            data, resp = self._request("GET", path, params=params)
            result = (data or {}).get("result")
            if not isinstance(result, list):
                raise ServiceNowBadResponseError(f"GET {path}: the answer has no result list", answer=self._excerpt(resp.text))
            pages, rows = pages + 1, rows + len(result)
            yield from result
            offset = _next_offset(resp, params["sysparm_offset"], page_size)
            if offset is None:
                break
            params["sysparm_offset"] = offset
        # One line per multi-page crawl; single-page look-ups (the engines make many) only at debug level.
        (self.log.info if pages > 1 else self.log.debug)("Read %d %s records in %d pages", rows, table, pages)

    def query_in(self, table: str, field: str, values: Iterable[str], query: str = "",
                 fields: Iterable[str] | None = None) -> list[dict]:
        """Records whose ``field`` is one of ``values`` (and match ``query``), in as few ``<field>IN...``
        queries as the URL length allows."""
        out: list[dict] = []
        for encoded in in_queries(field, values, prefix=query):
            out.extend(self.query(table, encoded, fields))
        return out

    def query(self, table: str, query: str = "", fields: Iterable[str] | None = None,
              limit: int | None = None) -> list[dict]:
        """Matching records as a list (all of them, or the first ``limit``)."""
        out: list[dict] = []
        for row in self.iter_records(table, query, fields, page_size=min(limit or 1000, 1000)):
            out.append(row)
            if limit and len(out) >= limit:
                break
        return out

    def create_record(self, table: str, values: dict) -> dict:
        data, _ = self._request("POST", self._table_path(table), json_body=values,
                                params={"sysparm_exclude_reference_link": "true"})
        return data["result"]

    def update_record(self, table: str, sys_id: str, values: dict) -> dict:
        data, _ = self._request("PATCH", self._table_path(table, sys_id), json_body=values,
                                params={"sysparm_exclude_reference_link": "true"})
        return data["result"]

    def delete_record(self, table: str, sys_id: str) -> None:
        """Delete a record; one that is already gone (404) counts as deleted."""
        _, resp = self._request("DELETE", self._table_path(table, sys_id), allow_404=True)
        if resp.status_code == 404:
            self.log.info("%s %s was already deleted", table, sys_id)

    # ----------------------------------------------------------------------------------- Batch API

    def batch(self, requests_: list[BatchRequest], *, max_rounds: int = 3) -> list[BatchResponse]:
        """Send many requests through ``/api/now/v1/batch`` (``batch_size`` per call), resubmitting the
        ``unserviced_requests``; answers come back in input order, failures per item."""
        ids = [r.id for r in requests_]
        if len(set(ids)) != len(ids):
            raise ValueError("BatchRequest ids must be unique")
        done: dict[str, BatchResponse] = {}
        for start in range(0, len(requests_), self.batch_size):
            pending = {r.id: r for r in requests_[start:start + self.batch_size]}
            stalled = 0
            while pending:
                data, resp = self._request("POST", BATCH_PATH, json_body={
                    "batch_request_id": uuid.uuid4().hex,
                    "rest_requests": [_batch_item(r) for r in pending.values()]})
                served = (data or {}).get("serviced_requests")
                if not isinstance(served, list):
                    raise ServiceNowBadResponseError(f"POST {BATCH_PATH}: the answer has no serviced_requests",
                                                     answer=self._excerpt(resp.text))
                before = len(pending)
                for item in served:
                    rid = str(item.get("id"))
                    if rid in pending:
                        done[rid] = _batch_response(item)
                        del pending[rid]
                if pending:
                    # Progress is fewer pending requests, not merely some answer: serviced items with ids we
                    # did not send must not make us resubmit (and so repeat) the same creates forever.
                    stalled = 0 if len(pending) < before else stalled + 1
                    self.log.info("Batch API left %d of %d requests unserviced; resubmitting them",
                                  len(pending), before)
                    if stalled >= max_rounds:
                        raise ServiceNowError(
                            f"POST {BATCH_PATH}: {len(pending)} requests stayed unserviced after {max_rounds} "
                            "resubmissions (the instance hit a batch size or time limit). Lower the batch "
                            "size and run the task again", answer=", ".join(list(pending)[:10]))
        failed = sum(not r.ok for r in done.values())
        self.log.info("Batch API: %d requests, %d failed", len(requests_), failed)
        return [done[i] for i in ids]

    # ----------------------------------------------------------------------------------- IRE

    def identify_reconcile(self, items: list[dict], data_source: str, *, enhanced: bool = False,
                           options: dict | str | None = None, dry_run: bool = False,
                           relations: list[dict] | None = None) -> dict:
        """Create or update CIs through the IRE; return the ``result`` object (items aligned with input).

        ``relations``: the IRE's ``relations`` (``{"parent": i, "child": j, "type": "<cmdb_rel_type name>"}``).

        The IRE answers 200 even when items fail: see :func:`ire_item_errors`. ``dry_run`` uses the
        ``/query`` endpoints, which report the operations without committing.
        """
        if options and not enhanced:
            raise ValueError("IRE options need enhanced=True")
        path = "/api/now/identifyreconcile" + {(False, False): "", (True, False): "/enhanced",
                                               (False, True): "/query", (True, True): "/queryEnhanced"}[
            (enhanced, dry_run)]
        params = {"sysparm_data_source": data_source}
        if options:
            params["options"] = options if isinstance(options, str) else ",".join(
                f"{k}:{str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())
        body: dict = {"items": items}
        if relations:
            body["relations"] = relations
        data, resp = self._request("POST", path, params=params, json_body=body)
        result = (data or {}).get("result")
        if not isinstance(result, dict):
            raise ServiceNowBadResponseError(f"POST {path}: the answer has no result object",
                                             answer=self._excerpt(resp.text))
        errors = ire_item_errors(result)
        codes = sorted({e.get("error", "?") for errs in errors.values() for e in errs})
        self.log.info("IRE %s: %d items sent, %d with errors%s", path.rsplit("/", 1)[-1], len(items),
                      len(errors), f" ({', '.join(codes)})" if codes else "")
        return result

    # ----------------------------------------------------------------------------------- UI

    def test_connection(self) -> tuple[bool, str]:
        """For the UI's Test button: authenticate and read one CMDB record id."""
        try:
            self._request("GET", self._table_path("cmdb_ci"),
                          params={"sysparm_limit": 1, "sysparm_fields": "sys_id", "sysparm_no_count": "true"})
        except ServiceNowError as exc:
            return False, str(exc)
        s = self.settings
        who = f"as {s.username}" if s.auth_type != "oauth_client_credentials" else "as the OAuth application user"
        return True, f"Connected to {self.instance_host} {who} ({s.auth_type}) and read the CMDB"
