from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import include, path


def fails(request: HttpRequest) -> HttpResponse:
    """A view that raises, holding the broker URL in a local variable as it does."""
    broker_url = settings.CARROT['default_broker']
    raise RuntimeError(f'cannot reach the broker ({len(broker_url)} characters)')


urlpatterns = [
    path('admin/', admin.site.urls),
    path('fails/', fails),
    # The monitor, twice: any prefix works, and a second mount has its own namespace.
    path('monitor/', include('carrot.urls')),
    path('ops/queue-monitor/', include('carrot.urls', namespace='carrot-ops')),
]
