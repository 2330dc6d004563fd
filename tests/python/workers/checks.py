"""The checks of the worker scripts: each raises AssertionError on a difference (the worker exits 1) and is counted,
so that a worker can end with "ok COUNT"."""

count = 0


def check(condition, what):
    global count
    if not condition:
        raise AssertionError(what)
    count += 1


def raises(error, fn, *words):
    """Calls fn, which must raise `error` with every one of `words` in its message; returns the message."""
    try:
        fn()
    except error as e:
        for w in words:
            check(w in str(e), f"{error.__name__} without '{w}': {e}")
        return str(e)
    raise AssertionError(f"no {error.__name__} from {fn}")
