"""Functions the API tests register as named tasks (the operator's registry)."""


def add(x: int, y: int) -> int:
    return x + y
