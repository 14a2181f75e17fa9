"""RQ over Redis: the no-op function (run by SimpleWorker, which does not fork per job)."""


def noop() -> None:
    return None
