"""The carrot monitor: web pages and a JSON API over MessageLog and ScheduledTask.

Mounted by a project with ``path('<any prefix>/', include('carrot.urls'))``. One module per
job: ``access`` (who may see and act), ``queries`` (filters and keyset pages), ``actions``
(every change, and its audit record), ``views`` (the pages), ``api`` (the JSON answers).
"""
