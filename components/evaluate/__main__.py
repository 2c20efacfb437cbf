"""`python -m vlpipe.components.evaluate --config FILE`."""

import typer

from vlpipe.components.evaluate.cli import eval_command

if __name__ == "__main__":
    typer.run(eval_command)
