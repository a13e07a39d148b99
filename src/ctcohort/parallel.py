"""Running one function over many items, in worker processes when asked."""

from collections.abc import Callable, Iterable


def map_processes(function: Callable, *iterables: Iterable, processes: int = 1) -> list:
    """``list(map(function, *iterables))``, in ``processes`` worker processes when more than one."""
    if processes <= 1:
        return list(map(function, *iterables))
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(processes) as pool:
        return list(pool.map(function, *iterables))
