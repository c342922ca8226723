"""The carrot monitor's URLs: ``path('<any prefix>/', include('carrot.urls'))``.

Every link, form and API call is reversed within the namespace the request came in by, so
the monitor can be mounted under any prefix, more than once (give each further mount its
own ``namespace``).
"""

from __future__ import annotations

from django.urls import path, register_converter

from carrot.monitor import api, queries, queue_views, views


class _Choice:
    """A path segment that is one of ``names``."""

    names: tuple[str, ...] = ()
    regex: str = ''

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        if value not in self.names:
            raise ValueError(value)
        return value


class _Status(_Choice):
    names = tuple(queries.STATUSES)
    regex = '|'.join(names)


class _TaskAction(_Choice):
    names = ('requeue', 'delete')
    regex = '|'.join(names)


class _ScheduleAction(_Choice):
    names = ('run', 'pause', 'resume')
    regex = '|'.join(names)


class _DeadLetterAction(_Choice):
    names = ('requeue', 'purge')
    regex = '|'.join(names)


register_converter(_Status, 'carrot_status')
register_converter(_DeadLetterAction, 'carrot_dead_letter_action')
register_converter(_TaskAction, 'carrot_task_action')
register_converter(_ScheduleAction, 'carrot_schedule_action')

app_name = 'carrot'

urlpatterns = [
    path('', views.index, name='index'),
    path('tasks/<carrot_status:status>/', views.task_list, name='task-list'),
    path('tasks/find/', views.task_find, name='task-find'),
    path('tasks/<int:pk>/', views.task_detail, name='task-detail'),
    path('tasks/<carrot_task_action:action>/', views.task_action, name='task-action'),
    path('schedules/', views.schedule_list, name='schedule-list'),
    path('schedules/new/', views.schedule_form, name='schedule-new'),
    path('schedules/<int:pk>/', views.schedule_detail, name='schedule-detail'),
    path('schedules/<int:pk>/edit/', views.schedule_form, name='schedule-edit'),
    path('schedules/<carrot_schedule_action:action>/', views.schedule_action,
         name='schedule-action'),
    path('overview/', views.overview_page, name='overview'),
    path('health/', views.health_page, name='health'),
    path('deadletters/', queue_views.dead_letter_queues, name='dead-letter-queues'),
    path('deadletters/<str:name>/', queue_views.dead_letters, name='dead-letters'),
    path('deadletters/<str:name>/<carrot_dead_letter_action:action>/',
         queue_views.dead_letter_action, name='dead-letter-action'),
    path('queues/<str:name>/purge/', queue_views.purge_queue, name='queue-purge'),
    path('audit/', views.audit_list, name='audit'),
    path('assets/<str:name>', views.asset, name='asset'),
    path('api/', api.root, name='api-root'),
    path('api/openapi.json', api.openapi_document, name='api-openapi'),
    path('api/tasks/<carrot_status:status>/', api.task_list, name='api-task-list'),
    path('api/tasks/find/', api.task_find, name='api-task-find'),
    path('api/tasks/<int:pk>/', api.task_detail, name='api-task-detail'),
    path('api/tasks/<carrot_task_action:action>/', api.task_action, name='api-task-action'),
    path('api/schedules/', api.schedule_list, name='api-schedule-list'),
    path('api/schedules/<int:pk>/', api.schedule_detail, name='api-schedule-detail'),
    path('api/schedules/<carrot_schedule_action:action>/', api.schedule_action,
         name='api-schedule-action'),
    path('api/overview/', api.overview_report, name='api-overview'),
    path('api/health/', api.health_report, name='api-health'),
    path('api/deadletters/', queue_views.dead_letter_queues, name='api-dead-letter-queues'),
    path('api/deadletters/<str:name>/', queue_views.dead_letters, name='api-dead-letters'),
    path('api/deadletters/<str:name>/<carrot_dead_letter_action:action>/',
         queue_views.dead_letter_action, name='api-dead-letter-action'),
    path('api/queues/<str:name>/purge/', queue_views.purge_queue, name='api-queue-purge'),
    path('api/audit/', api.audit, name='api-audit'),
]
