"""The same settings as YAML, shaped like the INI (for infrastructure-as-code pipelines)::

    Config:
      DTSETUPTYPE: DTNT
      PORT: 6320
    Alpha:
      PORT: 6321

Top-level keys are section names (case-sensitive), each mapping the DTSetup keys (case-
insensitive) to scalars. The reader works on the node graph (``yaml.compose``), so every
entry keeps its line and duplicate keys are found instead of silently overwritten.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from dtsetup.reports import Code, Report, error
from dtsetup.source import RawDocument, RawEntry, RawSection, read_with

__all__ = ["load", "parse"]

_BOOL_TAG = "tag:yaml.org,2002:bool"
_YAML_BREAK = re.compile("\r\n|[\r\n\x85\u2028\u2029]")  # YAML's line breaks
_NULL_TAG = "tag:yaml.org,2002:null"


def _scalar_value(node: yaml.ScalarNode) -> str | None:
    if node.tag == _NULL_TAG:
        return None
    if node.tag == _BOOL_TAG:
        # YAML 1.1 booleans (true/yes/on...) stand for the seed's Y/N [seed L660-667].
        return "Y" if node.value.lower() in ("true", "yes", "on") else "N"
    return node.value if node.value != "" else None


def parse(text: str, file: str) -> tuple[RawDocument, list[Report]]:
    doc = RawDocument(file=file)
    reports: list[Report] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = mark.line + 1 if mark is not None else None
        position = getattr(exc, "position", None)  # a ReaderError (a character YAML refuses)
        if line is None and isinstance(position, int):
            line = len(_YAML_BREAK.findall(text, 0, position)) + 1
        return doc, [error(Code.YAML_SYNTAX, f"YAML syntax: {problem}", file=file, line=line)]
    if root is None:
        return doc, [
            error(Code.NO_SECTIONS, "empty document: no Config or machine section", file=file)
        ]
    if not isinstance(root, yaml.MappingNode):
        return doc, [
            error(
                Code.YAML_SHAPE,
                "top level must map section names (Config, machine names) to settings",
                file=file,
                line=root.start_mark.line + 1,
            )
        ]
    for name_node, body in root.value:
        line = name_node.start_mark.line + 1
        if not isinstance(name_node, yaml.ScalarNode) or name_node.tag == _NULL_TAG:
            reports.append(
                error(Code.YAML_SHAPE, "section name must be a string", file=file, line=line)
            )
            continue
        name = str(name_node.value)
        if not name.strip():
            reports.append(
                error(Code.EMPTY_SECTION_NAME, "empty section name", file=file, line=line)
            )
            continue
        if name in doc.sections:
            reports.append(
                error(
                    Code.DUPLICATE_SECTION,
                    f"section {name} appears again (first at line {doc.sections[name].line})",
                    file=file,
                    line=line,
                    section=name,
                )
            )
            continue
        section = RawSection(name=name, line=line)
        doc.sections[name] = section
        if isinstance(body, yaml.ScalarNode) and body.tag == _NULL_TAG:
            continue  # "Alpha:" with nothing under it: an empty section
        if not isinstance(body, yaml.MappingNode):
            reports.append(
                error(
                    Code.YAML_SHAPE,
                    f"section {name} must map keys to values",
                    file=file,
                    line=body.start_mark.line + 1,
                    section=name,
                )
            )
            continue
        for key_node, value_node in body.value:
            kline = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _NULL_TAG:
                reports.append(
                    error(
                        Code.YAML_SHAPE, "key must be a string", file=file, line=kline, section=name
                    )
                )
                continue
            written = str(key_node.value)
            key = written.upper()
            if key in section.entries:
                reports.append(
                    error(
                        Code.DUPLICATE_KEY,
                        f"key {written} appears again in {name} (first at line "
                        f"{section.entries[key].line})",
                        file=file,
                        line=kline,
                        section=name,
                        key=key,
                    )
                )
                continue
            if not isinstance(value_node, yaml.ScalarNode):
                reports.append(
                    error(
                        Code.BAD_VALUE,
                        f"{written} must be a single value, not a list or mapping",
                        file=file,
                        line=kline,
                        section=name,
                        key=key,
                    )
                )
                continue
            section.entries[key] = RawEntry(
                key=key, written_key=written, value=_scalar_value(value_node), line=kline
            )
    if not doc.sections and not reports:
        reports.append(error(Code.NO_SECTIONS, "no Config or machine section", file=file))
    return doc, reports


def load(path: Path, *, text: str | None = None) -> tuple[RawDocument, list[Report]]:
    return read_with(parse, path, text=text)
