"""Error reports without the broker password.

Django's ``SafeExceptionReporterFilter`` hides settings whose *name* looks secret
(``PASSWORD``, ``KEY``, ``TOKEN`` ...). Neither ``CARROT`` nor ``default_broker`` does, so
the debug page and the report ``AdminEmailHandler`` mails would show
``amqp://user:secret@host``. This filter also hides the password of every URL it finds in
settings and in a traceback's local variables::

    DEFAULT_EXCEPTION_REPORTER_FILTER = 'carrot.reporting.SafeExceptionReporterFilter'

System check ``carrot.W002`` warns while a broker URL in ``CARROT`` holds a password and
this filter (or a subclass) is not in use.
"""

from __future__ import annotations

import re
from typing import Any

from django.http import HttpRequest
from django.views.debug import SafeExceptionReporterFilter as DjangoFilter

# scheme://user:password@ — the password is what lies between the first ':' of the
# user information and the '@' before the host.
_URL_PASSWORD = re.compile(r'(?P<head>\b[a-z][a-z0-9+.-]*://[^\s:/@]*:)(?P<password>[^\s@/]+)@',
                           re.IGNORECASE)


def mask_url_passwords(text: str, substitute: str = '********************') -> str:
    """``text`` with the password of every URL in it replaced by ``substitute``."""
    if '://' not in text:
        return text
    return _URL_PASSWORD.sub(lambda found: f'{found["head"]}{substitute}@', text)


def holds_url_password(text: str) -> bool:
    """Whether ``text`` holds a URL with a password."""
    return _URL_PASSWORD.search(text) is not None


class SafeExceptionReporterFilter(DjangoFilter):
    """Django's filter, and no URL password in settings or a traceback's variables."""

    def cleanse_setting(self, key: Any, value: Any) -> Any:
        cleansed = super().cleanse_setting(key, value)
        if isinstance(cleansed, str):
            return mask_url_passwords(cleansed, self.cleansed_substitute)
        return cleansed

    def cleanse_special_types(self, request: HttpRequest | None, value: Any) -> Any:
        return self._masked(super().cleanse_special_types(request, value), depth=3)

    def _masked(self, value: Any, depth: int) -> Any:
        """``value`` with URL passwords masked in it and in the containers it holds."""
        if isinstance(value, str):
            return mask_url_passwords(value, self.cleansed_substitute)
        if depth == 0:
            return value
        if type(value) is dict:
            return {key: self._masked(item, depth - 1) for key, item in value.items()}
        if type(value) in (list, tuple):
            return type(value)(self._masked(item, depth - 1) for item in value)
        return value
