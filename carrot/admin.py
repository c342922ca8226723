"""The carrot records in the Django admin."""

from __future__ import annotations

from django.contrib import admin

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
    list_display = ('task_name', 'task', 'interval_display', 'queue', 'active')
    list_filter = ('active', 'queue', 'interval_type')
    search_fields = ('task_name', 'task')
