"""The one exception type for bad user input; the CLI prints it as one line."""


class ParetoslimError(Exception):
    """A problem with what the user supplied (spec, task, study, arguments).

    The message names what is wrong, where, and what to do; it is shown without a traceback.
    """
