"""``edgellm pull | list | rm``: thin wrappers over ``edgellm.catalog`` (no torch import)."""
from __future__ import annotations

import json

import click

from edgellm.cli.options import MODEL


def human_size(n: int) -> str:
    """Bytes in binary units, one decimal: ``human_size(98_362_432) == '93.8 MiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns separated by two spaces; the last column is not padded."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = ["  ".join([c.ljust(w) for c, w in zip(r, widths)] + [r[-1]]).rstrip() for r in [header, *rows]]
    return "\n".join(lines)


@click.command("pull")
@click.argument("model", type=MODEL)
def pull_command(model: str) -> None:
    """Download MODEL into the cache and verify it (a catalog name or Hugging Face repo id).

    A model already cached and intact is not downloaded again. Progress goes to stderr.
    """
    from edgellm.catalog import pull

    path = pull(model, progress=True)
    click.echo(f"{model}: {path}")


def list_rows() -> tuple[list[dict], list[dict]]:
    """Cached models, and catalog models not yet pulled, as plain dicts."""
    from edgellm.catalog import CATALOG, list_cached

    cached = [{"name": m.name, "size": m.size, "path": str(m.path), "source": m.source} for m in list_cached()]
    have = {m["name"] for m in cached}
    available = [{"name": e.name, "size": e.size, "path": None, "source": f"{e.source}:{e.package}",
                  "description": e.description, "runnable": e.runnable}
                 for e in CATALOG.values() if e.name not in have]
    return cached, available


@click.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON: {cached: [...], available: [...]}.")
def list_command(as_json: bool) -> None:
    """List the models in the cache (name, size, path), then catalog models not yet pulled."""
    from edgellm.catalog import models_dir

    cached, available = list_rows()
    if as_json:
        click.echo(json.dumps({"cache": str(models_dir()), "cached": cached, "available": available}, indent=2))
        return
    if cached:
        click.echo(format_table(("NAME", "SIZE", "PATH"),
                                [(m["name"], human_size(m["size"]), m["path"]) for m in cached]))
    else:
        click.echo(f"No models in the cache ({models_dir()}).")
    if available:
        click.echo("\nIn the catalog, not pulled (edgellm pull NAME):")
        click.echo(format_table(("NAME", "SIZE", "ABOUT"), [
            (m["name"], human_size(m["size"]), m["description"] + ("" if m["runnable"] else " [not runnable yet]"))
            for m in available]))


@click.command("rm")
@click.argument("models", nargs=-1, required=True, type=MODEL, metavar="MODEL...")
def rm_command(models: tuple[str, ...]) -> None:
    """Remove MODEL(s) from the cache. Fails if one was not cached."""
    from edgellm.catalog import remove

    missing = []
    for name in models:
        if remove(name):
            click.echo(f"removed {name}")
        else:
            missing.append(name)
    if missing:
        raise click.ClickException(f"not in the cache: {', '.join(missing)} (see `edgellm list`)")


__all__ = ["format_table", "human_size", "list_command", "pull_command", "rm_command"]
