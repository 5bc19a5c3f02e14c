"""The stack's one error type: a message for a person, printed without a traceback."""


class StackError(Exception):
    pass
