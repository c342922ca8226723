"""The public producer API under upstream django-carrot's names.

Publishing lives in carrot.publishing and scheduling in carrot.scheduling; this module gives
both the import path upstream's projects use (``from carrot.utilities import
publish_message``).
"""

from __future__ import annotations

from carrot.publishing import (
    Message,
    create_message,
    get_host_from_name,
    publish_message,
    publish_together,
    validate_task,
)
from carrot.scheduling import create_scheduled_task, run_now

__all__ = ['Message', 'create_message', 'create_scheduled_task', 'get_host_from_name',
           'publish_message', 'publish_together', 'run_now', 'validate_task']
