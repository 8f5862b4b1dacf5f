"""A policy module the test server does not allow: importing it would be visible in sys.modules."""


class Policy:
    def eval(self, parameters, input_data, context):  # pragma: no cover - must never run
        raise AssertionError("a disallowed policy module was imported")
