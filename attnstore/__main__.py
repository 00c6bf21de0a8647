from attnstore.cli import cli

cli()
