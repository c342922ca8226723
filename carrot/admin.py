"""The carrot records in the Django admin, with the monitor's actions.

The actions go through ``carrot.monitor.actions``, as the monitor's do, and are written to
its audit log. ``status`` is read-only: it changes only through carrot's own transitions.
"""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from carrot.models import MessageLog, MonitorAction, ScheduledTask
from carrot.monitor import access, actions


def _report(model_admin: admin.ModelAdmin[Any], request: HttpRequest,
            result: actions.Result, target: str) -> None:
    actions.record(result, access.who(request), f'{target} (from the admin)')
    level = messages.SUCCESS if result.count or not result.skipped else messages.WARNING
    model_admin.message_user(request, result.summary, level)
    for reason in result.reasons if result.skipped else ():
        model_admin.message_user(request, reason, messages.WARNING)


@admin.register(MessageLog)
class MessageLogAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ('task', 'status', 'queue', 'priority', 'attempts', 'publish_time',
                    'completion_time', 'failure_time')
    list_filter = ('status', 'queue', 'publish_time')
    search_fields = ('=uuid', '^task', 'exception')
    readonly_fields = ('status', 'uuid', 'publish_time', 'completion_time', 'failure_time',
                       'attempts')
    date_hierarchy = 'publish_time'
    actions = ('requeue', 'delete_finished')
    show_full_result_count = False  # no COUNT(*) over the whole table on each page

    def get_actions(self, request: HttpRequest, action_location: Any = None) -> dict[str, Any]:
        # Django 6.1 passes action_location (and warns about an override without it);
        # 5.2 and 6.0 know no such argument.
        found = (super().get_actions(request) if action_location is None
                 else super().get_actions(request, action_location=action_location))  # type: ignore[call-arg]
        found.pop('delete_selected', None)  # delete_finished, which keeps unfinished rows
        return found

    @admin.action(description='Requeue the selected failed tasks', permissions=['change'])
    def requeue(self, request: HttpRequest, queryset: QuerySet[MessageLog]) -> None:
        pks = list(queryset.values_list('pk', flat=True)[:actions.MAX_ROWS + 1])
        _report(self, request, actions.requeue(pks), actions.describe_ids('tasks', pks))

    @admin.action(description='Delete the selected completed or failed tasks',
                  permissions=['delete'])
    def delete_finished(self, request: HttpRequest, queryset: QuerySet[MessageLog]) -> None:
        pks = list(queryset.values_list('pk', flat=True)[:actions.MAX_ROWS + 1])
        _report(self, request, actions.delete(pks), actions.describe_ids('tasks', pks))


@admin.register(ScheduledTask)
class ScheduledTaskAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ('task_name', 'task', 'interval_display', 'queue', 'active', 'last_run_at',
                    'next_run_at')
    list_filter = ('active', 'queue', 'interval_type')
    search_fields = ('task_name', 'task')
    readonly_fields = ('last_run_at',)
    actions = ('run_now', 'pause', 'resume')

    @admin.action(description='Run the selected scheduled tasks now')
    def run_now(self, request: HttpRequest, queryset: QuerySet[ScheduledTask]) -> None:
        pks = list(queryset.values_list('pk', flat=True))
        result = actions.run_now(pks)
        actions.record(result, access.who(request),
                       f'{actions.describe_ids("scheduled tasks", pks)} (from the admin)')
        for name, message_id in result.published:
            self.message_user(request, f'Published {name} as message {message_id}',
                              messages.SUCCESS)
        for reason in result.reasons:
            self.message_user(request, reason.split(': ', 1)[-1], messages.ERROR)

    @admin.action(description='Pause the selected scheduled tasks', permissions=['change'])
    def pause(self, request: HttpRequest, queryset: QuerySet[ScheduledTask]) -> None:
        pks = list(queryset.values_list('pk', flat=True))
        _report(self, request, actions.set_active(pks, False),
                actions.describe_ids('scheduled tasks', pks))

    @admin.action(description='Resume the selected scheduled tasks', permissions=['change'])
    def resume(self, request: HttpRequest, queryset: QuerySet[ScheduledTask]) -> None:
        pks = list(queryset.values_list('pk', flat=True))
        _report(self, request, actions.set_active(pks, True),
                actions.describe_ids('scheduled tasks', pks))


@admin.register(MonitorAction)
class MonitorActionAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    """The audit log: read-only."""

    list_display = ('at', 'username', 'action', 'target', 'count')
    list_filter = ('action',)
    search_fields = ('username', 'target')

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
