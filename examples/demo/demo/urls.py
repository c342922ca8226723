from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path('admin/', admin.site.urls),
    # The carrot monitor: log in at /admin/ as a staff user, then open /monitor/.
    path('monitor/', include('carrot.urls')),
]
