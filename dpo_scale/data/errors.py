class DataError(ValueError):
    """Bad preference data or tokenizer. The message names the file, the line or row, the field, and how to fix it.

    The command line prints the message alone, without a traceback.
    """
