from steinpix._cli.main import cli

cli()
