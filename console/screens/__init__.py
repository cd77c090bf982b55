"""One module per screen: merchants, queue, confirmation, progress, audit, help."""
