"""Front ends: the command line, the web page, the demo."""
