"""MkDocs hooks: the site's guides are the repository's READMEs, not copies of them.

* A page holding ``<!-- readme: README.md -->`` gets that file's text; with
  ``<!-- readme: README.md#Title -->`` only its section ``## Title`` (up to the next ``## ``
  heading; at the top of a page, titled ``# Title``); ``#PREAMBLE`` is the text before the
  first ``## `` heading.
* A README link to a heading of its own (``[Guarantees](#guarantees)``) points, on the site,
  at the page that holds that heading's section.
* Every public object of the API pages must have a docstring: one without is reported as a
  warning, which ``mkdocs build --strict`` turns into a failure.
"""

import logging
import pathlib
import re

import griffe

ROOT = pathlib.Path(__file__).resolve().parent.parent
_INCLUDE = re.compile(r"<!-- readme: ([^#\s]+)(?:#([^>]+?))? -->")
log = logging.getLogger("mkdocs.hooks.warpkeras")


def _section(text, title, source, top):
    if title == "PREAMBLE":
        first = re.search(r"^## ", text, re.M)
        return text[: first.start()] if first else text
    match = re.search(rf"^## {re.escape(title)}\n", text, re.M)
    if match is None:
        raise ValueError(f"{source} has no section '## {title}'")
    end = re.search(r"^## ", text[match.end() :], re.M)
    body = text[match.end() : match.end() + end.start() if end else len(text)]
    return f"{'#' if top else '##'} {title}\n{body}"


def _include(match):
    source, title = match.group(1), match.group(2)
    text = (ROOT / source).read_text()
    if not title:
        return text
    return _section(text, title.strip(), source, top=match.start() == 0)


def _slug(title):
    """The anchor Python-Markdown's toc extension gives a heading (its default slugify)."""
    title = re.sub(r"[^\w\s-]", "", title.replace("`", "")).strip().lower()
    return re.sub(r"[-\s]+", "-", title)


_HEADING = re.compile(r"^#{1,6} (.+?)\s*$", re.M)
_ANCHOR_LINK = re.compile(r"\]\(#([\w-]+)\)")
_anchor_pages = {}


def on_files(files, config):
    """Maps the anchor of every heading the README sections bring to the page holding it."""
    _anchor_pages.clear()
    for file in files.documentation_pages():
        text = pathlib.Path(file.abs_src_path).read_text()
        for match in _INCLUDE.finditer(text):
            included = _include(match)
            for heading in _HEADING.finditer(included):
                _anchor_pages.setdefault(_slug(heading.group(1)), file.src_uri)
    return files


def _relative(target, page):
    here = pathlib.PurePosixPath(page.file.src_uri).parent
    return pathlib.PurePosixPath(*[".."] * len(here.parts), target).as_posix()


def on_page_markdown(markdown, page, config, files):
    markdown = _INCLUDE.sub(_include, markdown)
    own = {_slug(h.group(1)) for h in _HEADING.finditer(markdown)}

    def relink(match):
        anchor = match.group(1)
        target = _anchor_pages.get(anchor)
        if anchor in own or target is None or target == page.file.src_uri:
            return match.group(0)
        return f"]({_relative(target, page)}#{anchor})"

    return _ANCHOR_LINK.sub(relink, markdown)


# Methods a class overrides from its Keras base class (layer, callback, optimizer), whose
# documentation is Keras's.
_KERAS_OVERRIDES = {
    "build",
    "call",
    "compute_output_shape",
    "compute_output_spec",
    "get_config",
    "from_config",
    "get_initial_state",
    "build_from_config",
    "get_build_config",
    "set_weights",
    "get_weights",
    "stateless_apply",
    "finalize_variable_values",
    "update_step",
    "on_train_begin",
    "on_train_end",
    "on_epoch_begin",
    "on_epoch_end",
    "on_train_batch_begin",
    "on_train_batch_end",
    "on_test_begin",
    "on_test_end",
    "on_test_batch_begin",
    "on_test_batch_end",
    "on_predict_begin",
    "on_predict_end",
    "set_model",
    "set_params",
}


def _documented_in_base(cls, name):
    """Whether a base class of `cls` inside warpkeras documents its method `name`."""
    for base in cls.resolved_bases:
        method = base.members.get(name)
        if method is not None and method.docstring:
            return True
        if _documented_in_base(base, name):
            return True
    return False


def _public_members(module):
    names = (
        module.exports
        if module.exports is not None
        else [
            n
            for n, m in module.members.items()
            if not n.startswith("_") and not m.is_alias and not m.is_module
        ]
    )
    for name in names:
        member = module.members.get(str(name))
        if member is None:
            continue
        if member.is_alias:
            try:
                member = member.final_target
            except griffe.AliasResolutionError:  # an object of another package
                continue
        if member.is_class or member.is_function:
            yield member


def _missing_docstrings(obj):
    if not obj.docstring:
        yield obj.path
    if obj.is_class:
        for name, member in obj.members.items():
            if name.startswith("_") or member.is_alias or not member.is_function:
                continue
            if name in _KERAS_OVERRIDES or _documented_in_base(obj, name):
                continue
            if not member.docstring:
                yield member.path


def on_post_build(config):
    package = griffe.load("warpkeras", search_paths=[str(ROOT)])
    pages = (ROOT / "docs" / "api").glob("*.md")
    modules = sorted(
        {m.group(1) for page in pages for m in re.finditer(r"^::: (\S+)", page.read_text(), re.M)}
    )
    seen = set()
    for path in modules:
        module = package if path == "warpkeras" else package[path.removeprefix("warpkeras.")]
        if path == "warpkeras":
            continue  # its names are aliases of the submodules' objects, checked there
        for obj in _public_members(module):
            if obj.path in seen or obj.is_module:
                continue
            seen.add(obj.path)
            for missing in _missing_docstrings(obj):
                log.warning(f"{missing} has no docstring")
