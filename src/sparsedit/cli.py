"""The `sparsedit` command line."""

from __future__ import annotations

from pathlib import Path

import typer


app = typer.Typer(add_completion=False, no_args_is_help=True, help="sparsedit: recompute only what an edit changed.")


@app.command()
def info() -> None:
    """Print versions and the backends this installation can use."""
    from .info import info_text

    typer.echo(info_text())


@app.command()
def demo(
    out: Path = typer.Option(Path("demo-out"), help="Folder for report.html and report.json."),
    size: int = typer.Option(256, help="Image size (pixels, square)."),
    repeats: int = typer.Option(3, help="Timed runs of each of dense and sparse (alternating); the median is shown."),
    scene_size: int = typer.Option(
        128, help="Resolution of the trained scene models' edits (trained at 64; both are convolutional)."
    ),
) -> None:
    """Edits with the trained scene models and full-size architectures; an HTML report of dense vs sparse."""
    from .demo import run_demo

    report = run_demo(out, size=size, repeats=repeats, scene_size=scene_size)
    for row in report["runs"]:
        typer.echo(
            f"{row['name']}: dense {row['dense_seconds'] * 1e3:.1f} ms, sparse {row['sparse_seconds'] * 1e3:.1f} ms "
            f"({row['speedup']:.2f}x), MACs {row['macs_ratio']:.1f}x fewer, max error {row['max_abs_error']:.2e}"
        )
    typer.echo(f"wrote {out / 'report.html'} and {out / 'report.json'}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
