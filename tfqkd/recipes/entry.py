"""What every recipe's ``main`` shares: its arguments, the model files' check, the start, exit codes."""

from tfqkd.console import run_cli
from tfqkd.recipes.args import recipe_parser, start_recipe
from tfqkd.recipes.runner import require_file

__all__ = ["recipe_main"]


def recipe_main(recipe, doc, body, argv=None):
    """Runs ``python -m tfqkd.recipes.<recipe>``.

    Parses the recipe arguments (the help's description: the first paragraph of ``doc``), checks
    that the trained model files given exist, starts or resumes the run (:func:`start_recipe`)
    and calls ``body(start)``.

    Args:
      recipe: the recipe's name ("qkd", "ptq", ...).
      doc: the recipe module's docstring.
      body: ``body(start)`` with the :class:`~tfqkd.recipes.args.RecipeStart`.
      argv: the arguments (default: the command line).

    Returns:
      the exit code: 0, or 2 after one line on stderr for bad input.
    """
    prog = f"tfqkd.recipes.{recipe}"
    args = recipe_parser(prog, doc.split("\n\n")[0]).parse_args(argv)

    def go():
        require_file(args.teacher_model, "teacher model")
        require_file(args.student_model, "student model")
        body(start_recipe(args, recipe))

    return run_cli(go, prog=prog)
