"""The `gmim` command line: thin Typer commands that parse options and call one library function each."""
