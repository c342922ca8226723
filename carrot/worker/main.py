"""The worker process: ``python manage.py carrot`` re-executes itself into this module.

The first statement monkey-patches, before Django, the database driver or ssl is imported.
"""

from carrot.worker import patch

IMPORTED_BEFORE_PATCHING = patch.patch_all()

import argparse  # noqa: E402
import gc  # noqa: E402
import io  # noqa: E402
import logging  # noqa: E402
import logging.handlers  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402

from carrot.worker.logcapture import LOG_FORMAT  # noqa: E402  (standard library only)
from carrot.worker.options import add_options  # noqa: E402


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog='manage.py carrot')
    add_options(p)
    return p


def configure_logging(logfile: str, level: str) -> None:
    """Log to ``logfile`` (reopened when logrotate moves it) and to standard output."""
    formatter = logging.Formatter(LOG_FORMAT)
    # A task may log text that is not valid Unicode (a file name Python could not decode):
    # it is written escaped rather than lost to a logging error.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors='backslashreplace')
    handlers: list[logging.Handler] = [
        logging.handlers.WatchedFileHandler(logfile, encoding='utf-8',
                                            errors='backslashreplace'),
        logging.StreamHandler(sys.stdout),
    ]
    root = logging.getLogger()
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.setLevel(level)
        root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger('carrot').setLevel(level)
    # amqpstorm logs every frame at DEBUG.
    logging.getLogger('amqpstorm').setLevel(max(logging.INFO, logging.getLevelName(level)))


def main(argv: list[str] | None = None, on_ready: Callable[[str], None] | None = None,
         on_failure: Callable[[str], None] | None = None) -> int:
    """Run the service; its exit status.

    ``carrot_daemon`` passes ``on_ready`` (called with the ready line once every consumer is
    subscribed) and ``on_failure`` (called with the reason the service cannot start).
    """
    options = parser().parse_args(argv)
    try:
        open(options.logfile, 'a').close()
    except OSError as error:
        message = (f'--logfile {options.logfile} cannot be written: {error.strerror}. '
                   f'Pass --logfile with a path you may write to.')
        print(f'carrot: {message}', file=sys.stderr)
        if on_failure is not None:
            on_failure(message)
        return 2

    import django

    django.setup()
    configure_logging(options.logfile, options.loglevel)

    from carrot.worker import logcapture, preflight
    from carrot.worker.service import Service

    log = logging.getLogger('carrot.worker')
    logcapture.install(logging.getLevelName(options.loglevel))
    if IMPORTED_BEFORE_PATCHING:
        log.error('Monkey-patching came after %s was imported; greenlets may block each other',
                  ', '.join(IMPORTED_BEFORE_PATCHING))
    for level, notice in preflight.notices():
        log.log(level, notice)
    problems = preflight.problems()
    if problems:
        for problem in problems:
            print(f'carrot: {problem}', file=sys.stderr)
            log.error(problem)
        if on_failure is not None:
            on_failure('\n'.join(problems))
        return 1
    if options.testmode:
        patched = patch.patched_modules()
        print('carrot testmode: monkey-patched '
              + ', '.join(name for name, done in patched.items() if done)
              + ('; imported before patching: ' + ', '.join(IMPORTED_BEFORE_PATCHING)
                 if IMPORTED_BEFORE_PATCHING else '; nothing imported before patching'))
        print('carrot testmode: broker and database answer; exiting')
        return 1 if IMPORTED_BEFORE_PATCHING or not all(patched.values()) else 0

    from carrot.conf import get_settings

    settings = get_settings()
    timeout = options.shutdown_timeout
    service = Service(settings, settings.shutdown_timeout if timeout is None else timeout,
                      scheduler=not options.no_scheduler, on_ready=on_ready)
    # Everything loaded so far (Django, the project, the tasks) lives as long as the
    # process. Out of the collector's sight, a full collection walks only what came later:
    # measured here, 1 ms instead of 27-47 ms during which no task ran.
    gc.collect()
    gc.freeze()
    return service.run()


if __name__ == '__main__':
    sys.exit(main())
