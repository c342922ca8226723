"""A task module that raises when imported, like a task whose code has a bug at import."""

raise RuntimeError('broken_tasks cannot be imported')


def never() -> None:  # pragma: no cover
    pass
