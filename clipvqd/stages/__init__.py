"""One module per subcommand; each exposes ``run(config, project, ...) -> dict``
(the summary the CLI prints). Stages read and write only through
clipvqd.project paths."""
