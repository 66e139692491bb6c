"""``dfkd recipes``: list, show, copy and validate recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dfkd_cli import interrupts
from dfkd_cli.cli_common import FormatOption, OutputFormat, user_errors
from dfkd_cli.errors import DfkdError

recipes_app = typer.Typer(help="List, show, copy and validate recipes.", invoke_without_command=True)


@recipes_app.callback()
@user_errors
def recipes_list(ctx: typer.Context, output_format: FormatOption = OutputFormat.human) -> None:
    """List recipes with a one-line description each."""
    if ctx.invoked_subcommand is not None:
        return
    from dfkd_cli.config import list_recipes, recipe_info
    from dfkd_cli.render import render_rows

    rows = []
    for name in list_recipes():
        info = recipe_info(name)
        rows.append({"name": name, "family": info.family, "needs_bn": "yes" if info.requires_bn else "no",
                     "description": info.description})
    render_rows(rows, output_format.value, title="recipes")


@recipes_app.command("show")
@user_errors
def recipes_show(name: Annotated[str, typer.Argument(help="Recipe name (see `dfkd recipes`); not a path.")]) -> None:
    """Print a shipped recipe."""
    from dfkd_cli.config import recipe_path

    print(recipe_path(name).read_text(encoding="utf-8"), end="")


@recipes_app.command("cp")
@user_errors
def recipes_cp(
    name: Annotated[str, typer.Argument(help="Recipe name (see `dfkd recipes`); not a path.")],
    dest: Annotated[Path, typer.Argument(help="Where to write the copy (a .toml file) to edit and pass to --recipe.")],
) -> None:
    """Copy a shipped recipe to edit it; use the copy with `dfkd compress --recipe my.toml`."""
    from dfkd_cli.atomic import atomic_write
    from dfkd_cli.config import recipe_path

    text = recipe_path(name).read_text(encoding="utf-8")
    if dest.exists() or dest.is_symlink():
        raise DfkdError(f"'{dest}' already exists; choose another destination")
    if not dest.parent.is_dir():
        raise DfkdError(f"cannot write '{dest}': folder '{dest.parent}' does not exist; create it or choose another destination")
    try:
        with interrupts.while_writing():  # Ctrl-C leaves no half-written copy
            atomic_write(dest, text)
    except OSError as err:
        raise DfkdError(f"cannot write '{dest}' ({err.strerror or err}); choose another destination") from None
    print(str(dest))


@recipes_app.command("validate")
@user_errors
def recipes_validate(path: Annotated[Path, typer.Argument(help="A recipe .toml file.")]) -> None:
    """Check a recipe file: known tables and keys, right types, on a GPU and (with its [cpu] table) a CPU. Exit 0 when valid."""
    from dfkd_cli.config import build_recipe, read_toml

    data = read_toml(path)
    cfg = build_recipe(data, [], default_name=path.stem, device_type="cuda")  # main tables; [cpu] keys checked too
    try:
        cpu = build_recipe(data, [], default_name=path.stem, device_type="cpu")
    except DfkdError as err:  # the main tables built, so the [cpu] table's values are at fault
        raise DfkdError(f"{err.message} (with the [cpu] table applied, as on a CPU)", err.exit_code) from None
    on_cpu = f", {cpu.train.steps} on a CPU" if cpu.train.steps != cfg.train.steps else ""
    print(f"{path}: valid ({cfg.recipe.synthesizer} synthesizer, {cfg.train.steps} student steps{on_cpu})")
