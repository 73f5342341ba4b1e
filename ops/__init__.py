"""Operations: the command line, settings, logging, metrics and the local stack."""
