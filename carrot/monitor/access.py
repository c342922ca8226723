"""Who may see the monitor, and who may act in it.

Seeing: active staff users by default; ``CARROT['monitor_authentication']`` (dotted paths of
view decorators, as in upstream django-carrot) replaces that check. Acting: the user must
hold the ``carrot.change_messagelog`` permission (superusers hold every permission), and
``CARROT['monitor_read_only']`` must not be set. Everyone else sees everything, read-only.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from django.contrib.auth.views import redirect_to_login
from django.http import HttpRequest, HttpResponse, HttpResponseBase, JsonResponse
from django.utils.module_loading import import_string
from django.views.decorators.csrf import csrf_protect

from carrot.conf import get_settings

View = Callable[..., HttpResponseBase]

#: The permission that lets a user act (requeue, delete, run now, pause, resume).
ACT_PERMISSION = 'carrot.change_messagelog'


def is_api(request: HttpRequest) -> bool:
    match = request.resolver_match
    return match is not None and match.url_name is not None and match.url_name.startswith('api-')


def refuse(request: HttpRequest, reason: str) -> HttpResponse:
    """403: as JSON to the API, as a short page to a browser."""
    if is_api(request):
        return JsonResponse({'error': reason}, status=403)
    from django.shortcuts import render

    return render(request, 'carrot/monitor/refused.html', {'reason': reason}, status=403)


def _staff_only(view: View) -> View:
    @functools.wraps(view)
    def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        user = getattr(request, 'user', None)
        if user is None or not user.is_authenticated:
            if is_api(request):
                return JsonResponse({'error': 'Log in as a staff user first.'}, status=403)
            return redirect_to_login(request.get_full_path())
        if not (user.is_active and user.is_staff):
            return refuse(request, 'The carrot monitor is for staff users only.')
        return view(request, *args, **kwargs)

    return guarded


@functools.cache
def _guarded(view: View, decorators: tuple[str, ...]) -> View:
    """``view`` behind the staff check, or behind the project's own decorators instead."""
    if not decorators:
        return _staff_only(view)
    for path in reversed(decorators):  # the first listed is the outermost, as written
        view = import_string(path)(view)
    return view


def monitor_view(view: View) -> View:
    """Every monitor page and API answer goes through this: access, then CSRF protection.

    The access rule is looked up at each request, so a settings change (or a test's
    ``override_settings``) takes effect at once.
    """
    protected = csrf_protect(view)

    @functools.wraps(view)
    def checked(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponseBase:
        chosen = _guarded(protected, get_settings().monitor_authentication)
        return chosen(request, *args, **kwargs)

    return checked


def read_only(request: HttpRequest) -> bool:
    """Whether this request may only look: the setting, or the permission missing."""
    if get_settings().monitor_read_only:
        return True
    user = getattr(request, 'user', None)
    return user is None or not user.is_authenticated or not user.has_perm(ACT_PERMISSION)


def why_read_only(request: HttpRequest) -> str:
    if get_settings().monitor_read_only:
        return "The monitor is read-only (CARROT['monitor_read_only'] is set)."
    return f'You may look but not act: acting needs the {ACT_PERMISSION} permission.'


def who(request: HttpRequest) -> str:
    """The name the audit log records for this request's user."""
    user = getattr(request, 'user', None)
    if user is None or not user.is_authenticated:
        return ''
    return str(user.get_username())
