"""The errors the services raise, in one tree. Each says what is wrong and what to do.

    ReconError
    ├── ConfigurationError          bad settings, credentials file, unknown merchant (exit 2)
    │   ├── CredentialsError
    │   └── ConsentFileError        a consent file that does not validate
    ├── SquareApiError              Square answered with an error envelope
    │   ├── SquareAuthError         401: token unknown, expired or revoked
    │   │   └── TokenMerchantMismatch   the token belongs to another merchant than its entry
    │   ├── SquareScopeError        403: token lacks a scope
    │   ├── SquareRateLimited       429 after our retries ran out
    │   ├── SquareNotFound          404
    │   ├── SquareInvalidRequest    400 (VERSION_MISMATCH and friends)
    │   └── SquareServerError       5xx after our retries ran out
    ├── SquareUnavailable           no answer at all (connection refused, timeouts)
    ├── AuditChainError             the audit chain does not verify
    └── ApprovalRefused             four-eyes: a batch without a valid second approval

The console maps these to one sentence in `console/messages.py`; the command line prints
`str(error)` on stderr.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "ApprovalRefused",
    "AuditChainError",
    "ConfigurationError",
    "ConsentFileError",
    "CredentialsError",
    "ReconError",
    "SquareApiError",
    "SquareAuthError",
    "SquareInvalidRequest",
    "SquareNotFound",
    "SquareRateLimited",
    "SquareScopeError",
    "SquareServerError",
    "SquareUnavailable",
    "TokenMerchantMismatch",
]


class ReconError(Exception):
    """Base of every error the services raise on purpose."""


class ConfigurationError(ReconError):
    pass


class CredentialsError(ConfigurationError):
    pass


class ConsentFileError(ConfigurationError):
    pass


@dataclass
class SquareApiError(ReconError):
    status: int
    code: str
    detail: str
    field: str | None = None
    category: str = ""
    retry_after: float | None = None

    def __str__(self) -> str:
        where = f" ({self.field})" if self.field else ""
        return f"Square answered {self.status} {self.code}{where}: {self.detail}"


class SquareAuthError(SquareApiError):
    def __str__(self) -> str:
        return (f"Square refused the access token ({self.code}): re-authorize this merchant and "
                "update the credentials file.")


class TokenMerchantMismatch(SquareAuthError):
    """Square says the token filed under `merchant_id` is another merchant's. Raised by the
    gateway before anything but the identity check is sent with that token."""

    def __init__(self, merchant_id: str, owner_id: str | None = None) -> None:
        # Only the owner's last characters: enough to find the mix-up, not a second id to leak.
        hint = f" (…{owner_id[-4:]})" if owner_id else ""
        super().__init__(status=0, code="TOKEN_MERCHANT_MISMATCH",
                         detail=f"token filed under {merchant_id} belongs to another "
                                f"merchant{hint}", category="AUTHENTICATION_ERROR")
        self.merchant_id = merchant_id
        self.owner_hint = hint

    def __str__(self) -> str:
        return (f"The access token filed under merchant {self.merchant_id} belongs to another "
                f"merchant{self.owner_hint}, so it is not used: put merchant "
                f"{self.merchant_id}'s own token under [merchants.{self.merchant_id}] in the "
                "credentials file.")


class SquareScopeError(SquareApiError):
    def __str__(self) -> str:
        return (f"The access token lacks a permission ({self.detail}): the merchant must "
                "re-authorize with ORDERS_READ, ORDERS_WRITE, PAYMENTS_READ and "
                "MERCHANT_PROFILE_READ.")


class SquareRateLimited(SquareApiError):
    def __str__(self) -> str:
        return "Square is rate limiting these requests: wait a minute and try again."


class SquareNotFound(SquareApiError):
    pass


class SquareInvalidRequest(SquareApiError):
    pass


class SquareServerError(SquareApiError):
    def __str__(self) -> str:
        return (f"Square had an internal error ({self.status} {self.code}) and kept failing "
                "after retries: try again shortly; check Square's status page if it persists.")


class SquareUnavailable(ReconError):
    """No HTTP answer: connection refused, reset or timed out."""


class AuditChainError(ReconError):
    pass


class ApprovalRefused(ReconError):
    """Four-eyes (issue 14): this batch may not run, or this decision may not be taken.
    `code` is one of APPROVAL_MISSING, APPROVAL_PENDING, APPROVAL_REJECTED, APPROVAL_EXPIRED,
    APPROVAL_SELF_GIVEN, APPROVAL_OTHER_SET, APPROVAL_USED, APPROVAL_DECIDED."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail
