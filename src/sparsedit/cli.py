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


@app.command("build-ops")
def build_ops(force: bool = typer.Option(False, help="rebuild even if this exact build exists")) -> None:
    """Compile the C++ CPU kernels for this torch and CPU (`make setup` runs this; about 10 s, once)."""
    from .ops import cpu

    try:
        path, seconds = cpu.build(force=force)
    except RuntimeError as e:
        typer.echo(f"error: {e}\nThe reference backend still runs everything, only slower.", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"built {path} in {seconds:.1f} s" if seconds else f"already built: {path}")


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


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", help="Address to listen on (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, help="Port."),
    model: list[Path] = typer.Option(
        [], "--model", help="A local diffusers pipeline directory to offer (repeatable)."
    ),
    workers: int = typer.Option(2, help="Sessions computing at the same time."),
    memory_budget: str = typer.Option(
        None, help="Bytes the live sessions' caches may hold, e.g. 4GiB (LRU parking; default: half the memory)."
    ),
    max_steps: int = typer.Option(100, help="Most denoising steps a session may ask for."),
    max_sessions_per_client: int = typer.Option(16, help="Most sessions one client address may hold."),
    max_pixels: int = typer.Option(1024 * 1024, help="Largest image accepted (pixels)."),
    max_sessions: int = typer.Option(64, help="Most sessions held at once."),
    reproducible: bool = typer.Option(
        False, help="Every edit sparse: the same bits on any machine (else: calibrated, never slower)."
    ),
    calibration: Path = typer.Option(
        None, help="Pin the sparse-or-dense calibration from this file (sparsedit.calibration.save)."
    ),
    insecure: bool = typer.Option(
        False,
        help="Serve on a --host other than loopback without --token, where anyone who reaches it can use it.",
    ),
    token: str = typer.Option(
        None, envvar="SPARSEDIT_TOKEN", help="A bearer token every request must carry (needed beyond loopback)."
    ),
    state_dir: Path = typer.Option(
        None,
        help="Where sessions are journaled and recovered from after a restart (default: "
        "$SPARSEDIT_STATE_DIR, else ~/.local/share/sparsedit/sessions).",
    ),
    ephemeral: bool = typer.Option(False, help="Keep sessions in memory only: nothing survives the process."),
    session_expiry: float = typer.Option(24.0, help="Hours after which an unused session is deleted (0: never)."),
    max_request_seconds: float = typer.Option(
        600.0,
        help="Refuse a session whose capture is predicted to take longer (seconds; measured once per model; "
        "0: no limit).",
    ),
    measure_dense: bool = typer.Option(
        False,
        help="Time one plain call of each model per input size after its first capture: the page then shows each "
        "edit's speed-up against it (else against the capture, which also fills the caches).",
    ),
    ray: bool = typer.Option(False, "--ray", help="Serve on Ray Serve: sessions spread over --replicas processes."),
    replicas: int = typer.Option(2, help="With --ray: how many replicas hold sessions."),
) -> None:
    """The web editor at / and the JSON API, on the shipped scene models (and --model directories)."""
    from .serve import is_loopback

    if not is_loopback(host):
        if not insecure and not token:
            typer.echo(f"sparsedit serve: --host {host} is reachable from other machines; give a --token (or "
                       "SPARSEDIT_TOKEN) that every request must carry, serve on 127.0.0.1, or pass --insecure to "
                       "serve without authentication anyway.", err=True)  # fmt: skip
            raise typer.Exit(2)
        if token:
            typer.echo(f"warning: serving on {host}, reachable from other machines; requests need the token "
                       "(open the page as /?token=...).", err=True)  # fmt: skip
        else:
            typer.echo(f"warning: serving on {host} without authentication: anyone who reaches it can use it.",
                       err=True)  # fmt: skip
    if ray:
        from .serve import ray_app

        typer.echo(
            f"sparsedit web editor on Ray Serve ({replicas} replicas): http://{host}:{port}/  (Ctrl-C stops it)"
        )
        try:
            ray_app.run(host, port, model, replicas=replicas, max_pixels=max_pixels,
                        memory_budget=parse_memory(memory_budget), max_sessions=max_sessions,
                        max_per_client=max_sessions_per_client, token=token, max_steps=max_steps,
                        max_request_seconds=max_request_seconds if max_request_seconds > 0 else None,
                        idle_expiry=session_expiry * 3600 if session_expiry > 0 else None)  # fmt: skip
        except ImportError as e:
            raise typer.BadParameter(str(e)) from None
        return
    from .serve import run
    from .serve.journal import default_state_dir

    if ephemeral and state_dir is not None:
        raise typer.BadParameter("--ephemeral keeps no state: drop --state-dir, or --ephemeral.")
    state = None if ephemeral else (state_dir or default_state_dir())
    typer.echo(f"sparsedit web editor: http://{host}:{port}/  (Ctrl-C stops it)"
               + ("" if state is None else f"; sessions kept in {state}"))  # fmt: skip
    run(host, port, model, workers=workers, memory_budget=memory_budget, max_pixels=max_pixels,
        max_sessions=max_sessions, reproducible=reproducible, calibration=calibration, state_dir=state,
        idle_expiry=session_expiry * 3600 if session_expiry > 0 else None, token=token, max_steps=max_steps,
        max_per_client=max_sessions_per_client,
        max_request_seconds=max_request_seconds if max_request_seconds > 0 else None,
        measure_dense=measure_dense)  # fmt: skip


@app.command()
def report(
    out: Path = typer.Option(Path("demo-out"), help="Folder for report.html and report.json."),
    size: int = typer.Option(256, help="Image size (pixels, square)."),
    repeats: int = typer.Option(3, help="Timed runs of each of dense and sparse (alternating); the median is shown."),
    scene_size: int = typer.Option(128, help="Resolution of the trained scene models' edits."),
) -> None:
    """The static HTML report of fixed edits, dense against sparse (what `demo` wrote before the web editor)."""
    demo(out=out, size=size, repeats=repeats, scene_size=scene_size)


@app.command()
def edit(
    model: str = typer.Option(..., help="scene-ddpm, scene-spade, or a local diffusers pipeline directory."),
    image: Path = typer.Option(..., help="The input image (for scene-spade: a label map PNG of class ids)."),
    out: Path = typer.Option(..., help="Where to write the edited result (PNG)."),
    edited: Path = typer.Option(None, help="The edited input (same size): the change is the edit region."),
    mask: Path = typer.Option(None, help="Inpainting: the mask PNG (white = regenerate)."),
    prompt: str = typer.Option(None, help="A prompt (the capture's), or the new prompt for a prompt edit."),
    new_prompt: str = typer.Option(None, help="Text models: edit to this prompt."),
    strength: float = typer.Option(None, help="SDEdit strength (the model's default if left out)."),
    steps: int = typer.Option(None, help="Denoising steps (the model's default if left out)."),
    seed: int = typer.Option(0, help="Random seed."),
) -> None:
    """Capture the input once, apply one edit sparsely, write the result, and report what it cost."""
    try:
        _edit(model, image, out, edited, mask, prompt, new_prompt, strength, steps, seed)
    except UserError as e:
        typer.echo(f"sparsedit edit: {e}", err=True)
        raise typer.Exit(2) from None


class UserError(Exception):
    """A mistake in the command's arguments or files: one line on stderr, no traceback."""


def _user_errors():
    """The exceptions that mean the user's input is wrong (a missing or unreadable file, a bad value, a stale or
    corrupt session), as opposed to a bug, which keeps its traceback."""
    from PIL import UnidentifiedImageError

    from .cache import StaleCacheError
    from .editors import CorruptSessionError

    return (ValueError, TypeError, FileNotFoundError, IsADirectoryError, NotImplementedError, KeyError,
            UnidentifiedImageError, StaleCacheError, CorruptSessionError)  # fmt: skip


def _edit(model, image, out, edited, mask, prompt, new_prompt, strength, steps, seed) -> None:
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from .serve.models import ModelRegistry, SessionEditor, png_to_array, tensor_to_png

    _check_paths(out, image=image, edited=edited, mask=mask)
    try:
        registry = ModelRegistry([model] if Path(model).is_dir() else [])
        spec = registry.get(Path(model).name if Path(model).is_dir() else model)
    except _user_errors() as e:
        raise UserError(f"--model {model}: {_message(e)}") from None
    key = "labels" if spec.kind == "gan" else "image"

    def read(path: Path) -> np.ndarray:
        try:  # the server's decoder: any mode to RGB colours, or a label map of class ids
            return png_to_array(path.read_bytes(), str(path), "rgb" if key == "image" else "ids")
        except ValueError:
            raise UserError(f"{path}: not an image this command can read.") from None

    state = {key: read(image)}
    if prompt is not None:
        state["prompt"] = prompt
    options = {
        **spec.defaults,
        **{k: v for k, v in {"strength": strength, "steps": steps, "seed": seed}.items() if v is not None},
    }
    change = dict(state)
    if edited is not None:
        change[key] = read(edited)
    if mask is not None:
        change["mask"] = np.asarray(Image.open(mask).convert("L"))
    if new_prompt is not None:
        change["prompt"] = new_prompt
    session = None
    try:
        with tqdm(total=2, desc="sparsedit edit", unit="run") as bar:
            bar.set_postfix_str("capture (dense)")
            session = SessionEditor(spec, options)
            session.capture(state)
            capture_seconds = session.editor.last_stats["seconds"]
            bar.update()
            bar.set_postfix_str("edit (sparse)")
            result = session.edit(change)
            bar.update()
        stats = session.editor.last_stats
    except _user_errors() as e:
        raise UserError(_message(e)) from None
    finally:
        if session is not None:
            session.close()
    out.write_bytes(tensor_to_png(result))
    typer.echo(f"wrote {out}: capture {capture_seconds:.2f} s (dense), edit {stats['seconds']:.2f} s, "
               f"{summary(stats)}")  # fmt: skip


def _check_paths(out: Path, **inputs: Path | None) -> None:
    """Before any computing: the result's folder exists, and so does every input file given."""
    if out.is_dir() or not out.parent.is_dir():
        raise UserError(f"--out {out}: give a file path in an existing folder (the edited result is written there).")
    for name, path in inputs.items():
        if path is not None and not path.is_file():
            raise UserError(f"--{name} {path}: no such file.")


def _message(e: Exception) -> str:
    return str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)


def summary(stats) -> str:
    """What an edit cost against dense, in words that never divide by zero."""
    if not stats["macs_sparse"]:
        return "nothing changed: the current result came back without computing"
    macs = stats["macs_dense"] / stats["macs_sparse"]
    return f"{macs:.1f}x fewer MACs, {100 * stats.get('region_fraction', 0):.1f}% recomputed"


def parse_memory(value):
    from .config import parse_bytes

    return parse_bytes(value, "--memory-budget")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
