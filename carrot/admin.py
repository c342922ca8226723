"""The carrot records in the Django admin."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from carrot.models import MessageLog, ScheduledTask


@admin.register(MessageLog)
class MessageLogAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ('task', 'status', 'queue', 'priority', 'attempts', 'publish_time',
                    'completion_time', 'failure_time')
    list_filter = ('status', 'queue')
    search_fields = ('task', 'uuid', 'exception')
    readonly_fields = ('uuid', 'publish_time', 'completion_time', 'failure_time', 'attempts')
    date_hierarchy = 'publish_time'


@admin.register(ScheduledTask)
class ScheduledTaskAdmin(admin.ModelAdmin):  # type: ignore[type-arg]
    list_display = ('task_name', 'task', 'interval_display', 'queue', 'active', 'last_run_at',
                    'next_run_at')
    list_filter = ('active', 'queue', 'interval_type')
    search_fields = ('task_name', 'task')
    readonly_fields = ('last_run_at',)
    actions = ('run_now',)

    @admin.action(description='Run the selected scheduled tasks now')
    def run_now(self, request: HttpRequest, queryset: QuerySet[ScheduledTask]) -> None:
        for row in queryset:
            try:
                log = row.run_now()
            except Exception as error:
                self.message_user(request, f'Not published {row.task_name}: {error}',
                                  messages.ERROR)
            else:
                self.message_user(request, f'Published {row.task_name} as message {log.uuid}',
                                  messages.SUCCESS)
