"""A griffe extension (mkdocs.yml loads it) that turns the docstrings' Sphinx roles into links.

The library's docstrings are written for readers of the source and `help()`: they name other
objects with Sphinx roles (:class:`LeaderElection`, :meth:`~LeaderElection.start`) and end a
paragraph with ``::`` before an example. Markdown knows neither. So, before mkdocstrings renders
them, each role becomes a cross-reference when its target is on the API reference page, and
plain code otherwise (a private helper, a test module), so that `mkdocs build --strict` fails
only on a real broken link, never on a docstring naming an internal; ``::`` becomes ``:``, and
reST simple tables become plain-text blocks.

A role is resolved the way Python would read the name where the docstring stands: in the
object's own scope, then its parents' (griffe's `resolve`), through re-exports to the object's
canonical path. A role naming what the package does not have (a typo, a renamed object) stays
a cross-reference, so that the build fails and names it. "On the page" means: exported by a
module that reference.md renders, public, with a docstring (mkdocstrings hides the rest), or a
public documented member of such a class.
"""

from __future__ import annotations

import builtins
import re
from typing import Any

import griffe

# The modules reference.md renders with `::: module`; keep the two lists in step.
RENDERED_MODULES = [
    "fastapi_leader",
    "fastapi_leader.events",
    "fastapi_leader.prometheus",
    "fastapi_leader.testing",
]

_ROLE = re.compile(r":(?:py:)?(?:class|attr|meth|func|exc|data|obj|mod|const):`(~?)([^`<]+)`")
_LITERAL_BLOCK = re.compile(r"(\S)::$", re.MULTILINE)
_LITERAL_ALONE = re.compile(r"^[ \t]*::[ \t]*\n", re.MULTILINE)
_TABLE_BORDER = re.compile(r"^[ \t]*=+( +=+)+[ \t]*$")


def _tables_as_text(text: str) -> str:
    """A reST simple table (rows between ``=== ===`` borders) as a plain-text block: Markdown
    would read its borders as headings."""
    lines, out, inside = text.split("\n"), [], False
    for i, line in enumerate(lines):
        following = lines[i + 1] if i + 1 < len(lines) else ""
        if _TABLE_BORDER.match(line) and not inside:
            out += ["```text", line]  # the top border
            inside = True
        elif _TABLE_BORDER.match(line) and not following.strip():
            out += [line, "```"]  # the bottom border: a blank line or the end follows
            inside = False
        else:
            out.append(line)
    if inside:
        out.append("```")
    return "\n".join(out)


def _public(path: str) -> bool:
    return not any(part.startswith("_") for part in path.split("."))


def _walk(obj: griffe.Object) -> list[griffe.Object]:
    found = [obj]
    for member in obj.members.values():
        if isinstance(member, griffe.Alias) or member.is_module:
            continue
        found.extend(_walk(member))
    return found


class SphinxRoles(griffe.Extension):
    """Rewrites Sphinx roles in every docstring of the package once it is loaded."""

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        """Collect what the reference page shows, then rewrite each docstring's roles."""
        collection = loader.modules_collection
        rendered: set[str] = set()
        for module_path in RENDERED_MODULES:
            module = collection.get_member(module_path)
            rendered.add(module.canonical_path)
            names = module.exports if module.exports is not None else list(module.members)
            for name in names:
                name = name if isinstance(name, str) else name.name
                if name not in module.members or name.startswith("_"):
                    continue
                member = module.members[name]
                target = _shadowed(member.final_target if member.is_alias else member)
                for obj in _walk(target):
                    if obj is target or (obj.docstring is not None and _public(obj.name)):
                        rendered.add(obj.canonical_path)

        def rewrite(obj: griffe.Object) -> None:
            if obj.docstring is not None:
                text = _ROLE.sub(
                    lambda m: self._link(obj, m, rendered, collection), obj.docstring.value
                )
                text = _LITERAL_ALONE.sub("", _LITERAL_BLOCK.sub(r"\1:", text))
                obj.docstring.value = _tables_as_text(text)
            for member in obj.members.values():
                if not isinstance(member, griffe.Alias):
                    rewrite(member)

        rewrite(pkg)

    @staticmethod
    def _link(
        obj: griffe.Object,
        match: re.Match[str],
        rendered: set[str],
        collection: griffe.ModulesCollection,
    ) -> str:
        tilde, target = match.group(1), match.group(2).strip()
        shown = target.rsplit(".", 1)[-1] if tilde else target
        canonical = _resolve(obj, target, collection)
        if canonical is None or (canonical not in rendered and _exists(canonical, collection)):
            return f"`{shown}`"  # outside the package, or an internal the reference leaves out
        return f"[`{shown}`][{canonical}]"


def _exists(path: str, collection: griffe.ModulesCollection) -> bool:
    try:
        collection.get_member(path)
    except (KeyError, ValueError):
        return False
    return True


def _shadowed(obj: Any) -> Any:
    """The function a module is named after, where the package exports the function under the
    module's name (`fastapi_leader.leader_only`): griffe finds the module first."""
    if obj.is_module and obj.name in obj.members:
        return obj.members[obj.name]
    return obj


def _resolve(obj: griffe.Object, target: str, collection: griffe.ModulesCollection) -> str | None:
    """The canonical path `target` names where `obj`'s docstring stands; None for an object
    outside the package (the standard library, a dependency); a path that will not resolve, so
    that the build fails naming it, for a name the package does not have (a typo, a rename)."""
    first, _, rest = target.partition(".")
    candidates = [target]  # an absolute path: fastapi_leader.events.ElectionObserver
    try:
        resolved = obj.resolve(first)  # a name in scope: LeaderElection.start
        candidates.insert(0, f"{resolved}.{rest}" if rest else resolved)
    except griffe.NameResolutionError:
        if not rest and first not in vars(builtins):
            return f"{obj.path}.{target}"  # neither in scope nor a builtin: a broken reference
    for candidate in candidates:
        try:
            found = _shadowed(collection.get_member(candidate))
            final = found.final_target if found.is_alias else found
        except (KeyError, ValueError, griffe.AliasResolutionError, griffe.CyclicAliasError):
            continue
        return str(final.canonical_path)
    if candidates[0].split(".", 1)[0] == obj.package.name:
        return candidates[0]  # in the package, not found: a broken reference
    return None  # another package's (apscheduler..., pydantic.ValidationError)
