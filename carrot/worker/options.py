"""The service's command-line options, shared by ``manage.py carrot`` and the worker process.

Standard library only: the worker reads them before it monkey-patches.
"""

from __future__ import annotations

import argparse
import math

LEVELS = ('DEBUG', 'INFO', 'WARNING', 'ERROR', 'CRITICAL')


def seconds(text: str) -> float:
    """A non-negative number of seconds, for argparse."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number of seconds')
    return value


def add_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--logfile', default='/var/log/carrot.log',
                        help='Where the service logs (default /var/log/carrot.log).')
    parser.add_argument('--loglevel', default='DEBUG', type=str.upper, choices=LEVELS,
                        help='The lowest level logged, and kept in task logs (default DEBUG).')
    parser.add_argument('--no-scheduler', action='store_true',
                        help='Do not publish scheduled tasks from this service (other '
                             'services may).')
    parser.add_argument('--testmode', action='store_true',
                        help='Start, check the broker and the database, and exit 0.')
    parser.add_argument('--shutdown-timeout', type=seconds, default=None,
                        help="Seconds running tasks get to finish on TERM or INT "
                             "(default CARROT['shutdown_timeout'], 60).")
