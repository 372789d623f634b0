"""The synthetic world the built-in model learns: clips from captions (`world`), the analyser that reads them back, `kinema eval`."""
