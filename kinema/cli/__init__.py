"""The command line: `kinema generate | eval | train | info`, thin users of the pipeline, trainers and media."""
