"""One exception hierarchy with plain messages.

Every message says what happened and what to do, and never contains a secret (tokens, passwords,
client secrets) or a whole response body: at most the first bytes of an unexpected answer.
"""

from __future__ import annotations


class IntegrationError(Exception):
    """Base class of every error this integration raises on purpose."""


class ConfigError(IntegrationError):
    """A setting (environment variable, rules file, connection field, trigger param) is invalid."""


# --------------------------------------------------------------------------- ServiceNow


class ServiceNowError(IntegrationError):
    """ServiceNow answered something we cannot use.

    :param message: plain text for people: what happened and what to do.
    :param status: the HTTP status, when there was a response.
    :param answer: a short, secret-free excerpt of what ServiceNow said.
    """

    def __init__(self, message: str, *, status: int | None = None, answer: str | None = None):
        super().__init__(message)
        self.status = status
        self.answer = answer


class ServiceNowAuthError(ServiceNowError):
    """Credentials rejected (token endpoint or a 401 after a fresh token)."""


class ServiceNowHibernatingError(ServiceNowError):
    """The instance answered with its hibernation page (HTML with status 200)."""


class ServiceNowRateLimitedError(ServiceNowError):
    """429 still returned after all retries."""


class ServiceNowUnavailableError(ServiceNowError):
    """Connection errors, timeouts or 5xx still failing after all retries."""


class ServiceNowInvalidTableError(ServiceNowError):
    """The table does not exist (or the user cannot see it)."""


class ServiceNowForbiddenError(ServiceNowError):
    """403: an ACL or a data policy refused the operation."""


class ServiceNowTransactionCancelledError(ServiceNowError):
    """The answer was cut off (truncated JSON): the instance cancelled the transaction."""


class ServiceNowBadResponseError(ServiceNowError):
    """A non-JSON or malformed answer where JSON was expected."""


# --------------------------------------------------------------------------- Defender for IoT


class DefenderError(IntegrationError):
    """A Defender for IoT appliance answered something we cannot use.

    :param message: plain text for people: what happened and what to do.
    :param status: the HTTP status, when there was a response.
    """

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class DefenderAuthError(DefenderError):
    """The API access token was rejected."""


class DefenderWrongApplianceError(DefenderError):
    """The connection's ``appliance`` extra does not match the appliance (e.g. 404 on /external/...)."""


class DefenderBadResponseError(DefenderError):
    """HTML, invalid JSON or an unexpected shape where the documented JSON was expected."""


class DefenderUnreachableError(DefenderError):
    """Connection refused, DNS failure or timeout after retries."""


class DefenderCertificateError(DefenderError):
    """TLS certificate verification failed."""


class DefenderForbiddenError(DefenderError):
    """The source accepted the credentials but refused the action (e.g. Azure 403: a role is missing);
    retrying cannot help until someone grants the role."""
